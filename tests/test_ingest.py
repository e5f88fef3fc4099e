"""Ingest on small real inputs: rendered glyphs, a folder with bad files, a webdataset tar."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from knn_diffusion.config import build_params
from knn_diffusion.data import sources
from knn_diffusion.data.ingest import ingest_dataset, split_for
from knn_diffusion.data.store import ImageStore
from knn_diffusion.io import atomic_dir, atomic_path, save_npy


def _data(**datasets):
    return build_params({"data": {"datasets": datasets, "generator_dataset": next(iter(datasets))}}).data


def _png(color, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _ingest(tmp_path, name, **spec):
    data = _data(**{name: spec})
    summary = ingest_dataset(name, data.datasets[name], data, tmp_path / name)
    return summary, ImageStore.open(tmp_path / name)


def test_openmoji_glyphs_render_in_colour_with_names(tmp_path):
    summary, store = _ingest(tmp_path, "om", source="openmoji", limit=12)
    assert summary.images == len(store) == 12
    images = store[store.rows()]
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert (images.reshape(12, -1, 3).std(axis=1).sum(axis=1) > 5).all(), "glyph renders must not be flat"
    captions = store.read_captions()
    assert captions.notna().sum() >= 10
    assert captions.iloc[0] == "keycap #"


def test_noto_glyphs(tmp_path):
    if sources.find_noto_font() is None:
        pytest.skip("fonts-noto-color-emoji not installed")
    summary, store = _ingest(tmp_path, "noto", source="noto", limit=6)
    assert len(store) == 6 and summary.named == 6
    assert store[0].reshape(-1, 3).std(axis=0).sum() > 5


def test_noto_missing_is_reported_as_unavailable(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "NOTO_FONT_PATHS", (tmp_path / "absent.ttf",))
    with pytest.raises(sources.SourceUnavailable, match="fonts-noto-color-emoji"):
        _ingest(tmp_path, "noto", source="noto", limit=2)


def test_blank_glyph_is_undrawable():
    from PIL import ImageFont

    font = ImageFont.truetype(str(sources.NOTO_FONT_PATHS[0]), 109) if sources.find_noto_font() else None
    if font is None:
        pytest.skip("fonts-noto-color-emoji not installed")
    assert sources.render_glyph(font, " ", max_width=500) is None
    assert sources.render_glyph(font, "\U0001F600", max_width=500) is not None


def test_folder_skips_corrupt_and_truncated_files(tmp_path, caplog):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "red.png").write_bytes(_png((255, 0, 0)))
    (folder / "red.txt").write_text("a red square\n")
    (folder / "sub" / "blue.gif").write_bytes(_png((0, 0, 255)))  # wrong extension still decodes
    (folder / "sub" / "clear.png").write_bytes(_png((0, 255, 0, 0), mode="RGBA"))
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    summary, store = _ingest(tmp_path, "mine", source="folder", path=str(folder))
    assert summary.images == 3
    assert summary.skipped == {"corrupt image": 2}
    assert any("broken.jpg" in r.getMessage() for r in caplog.records)
    assert any("truncated.jpg" in r.getMessage() for r in caplog.records)
    origins = list(store.manifest["origin"])
    assert origins == ["red.png", "sub/blue.gif", "sub/clear.png"]
    assert store.read_captions().tolist() == ["a red square", None, None]
    assert tuple(store[0][16, 16]) == (255, 0, 0)
    assert tuple(store[2][16, 16]) == (255, 255, 255), "transparent pixels composite on the background"


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(sources.SourceError, match="does not exist"):
        _ingest(tmp_path, "x", source="folder", path=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.SourceError, match=r"empty.*holds no images"):
        _ingest(tmp_path, "x", source="folder", path=str(tmp_path / "empty"))


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, payload in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_webdataset_two_samples(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00000.tar", {
        "000000000.jpg": _png((200, 30, 30)), "000000000.txt": b"a red thing",
        "000000001.jpg": _png((30, 30, 200)), "000000001.json": json.dumps({"caption": "blue"}).encode(),
    })
    summary, store = _ingest(tmp_path, "wds", source="webdataset", path=str(shards))
    assert summary.images == 2
    assert store.read_captions().tolist() == ["a red thing", "blue"]
    assert list(store.manifest["origin"]) == ["00000.tar:000000000", "00000.tar:000000001"]


def test_webdataset_not_a_tar(tmp_path):
    bad = tmp_path / "00000.tar"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(sources.SourceError, match=r"00000.tar' is not a readable tar"):
        _ingest(tmp_path, "wds", source="webdataset", path=str(bad))


def test_duplicates_are_dropped_and_counted(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"same{i}.png").write_bytes(_png((9, 99, 199)))
    (folder / "other.png").write_bytes(_png((1, 2, 3)))
    summary, store = _ingest(tmp_path, "d", source="folder", path=str(folder))
    assert summary.images == 2 and summary.duplicates == 2
    assert store.manifest["content_hash"].is_unique


def test_split_is_deterministic_and_follows_fractions():
    import hashlib

    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    first = [split_for(h, 0.05, 0.1) for h in hashes]
    assert first == [split_for(h, 0.05, 0.1) for h in hashes]
    assert abs(first.count("test") / 4000 - 0.1) < 0.02
    assert abs(first.count("val") / 4000 - 0.05) < 0.02
    # growing the val fraction never moves a test image
    assert all(s == "test" for s, h in zip(first, hashes) if split_for(h, 0.2, 0.1) == "test")


def test_same_input_gives_identical_output(tmp_path):
    _, a = _ingest(tmp_path / "a", "om", source="openmoji", limit=5)
    _, b = _ingest(tmp_path / "b", "om", source="openmoji", limit=5)
    assert (a.manifest == b.manifest).all().all()
    assert np.array_equal(a[a.rows()], b[b.rows()])


def test_atomic_file_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.npy"
    save_npy(target, np.arange(3))
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert np.load(target).tolist() == [0, 1, 2]
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_dir_keeps_previous_output_on_failure(tmp_path):
    out = tmp_path / "ingest"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("v2-partial")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingest"]
