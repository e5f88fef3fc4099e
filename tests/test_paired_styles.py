"""More paired (image, name) data from npm emoji styles, split between the retrieval encoder and the judge.

- an Iconify set is rendered with resvg and every icon named by its emoji's code points, so one emoji
  has one caption in every style (chars.json, else the icon name matched to CLDR/Unicode names);
- paired corpora come from several styles, the held-out test names still dropped;
- the judge's training pairs, the retrieval encoder's pairs and the test split are pairwise disjoint by
  content hash, and the judge stage refuses to train when they are not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from knn_diffusion.config import ConfigError, build_params
from knn_diffusion.data.config import DataConfig, DatasetConfig, Source
from knn_diffusion.data.iconify import iconify_items
from knn_diffusion.data.independence import check_disjoint
from knn_diffusion.data.ingest import ingest_dataset
from knn_diffusion.data.sources import SourceStats, SourceUnavailable, emoji_name
from knn_diffusion.data.store import ImageStore
from knn_diffusion.stages import embed, judge, paths
from knn_diffusion.stages.encoder import PAIRS, held_out_eval, paired_corpus
from tests.conftest import copy_outputs

CIRCLE = '<circle cx="8" cy="8" r="{r}" fill="{fill}"/>'


def write_iconify_set(folder: Path, icons: dict[str, str], chars: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body = {name: {"body": CIRCLE.format(r=r, fill=fill)} for name, (r, fill) in icons.items()}
    (folder / "icons.json").write_text(json.dumps({"prefix": folder.name, "icons": body, "width": 16, "height": 16}))
    if chars is not None:
        (folder / "chars.json").write_text(json.dumps(chars))
    return folder / "icons.json"


def test_iconify_icons_get_the_emoji_names_of_their_code_points(tmp_path):
    with_chars = write_iconify_set(tmp_path / "a", {"heart-red": (7, "red"), "logo": (3, "blue")},
                                   chars={"2764-fe0f": "heart-red"})
    by_name = write_iconify_set(tmp_path / "b", {"red-apple": (6, "red"), "aubergine": (5, "purple"),
                                                 "green-apple": (0, "green")})
    stats = SourceStats()
    a = list(iconify_items(str(with_chars), stats))
    b = list(iconify_items(str(by_name), stats))
    assert [(i.origin, i.caption) for i in a] == [("2764-FE0F", emoji_name("\u2764\ufe0f"))]
    assert a[0].caption == "red heart"
    # CLDR name "red apple"; Unicode character name AUBERGINE (Mozilla's fxemoji names) -> eggplant
    assert sorted(i.caption for i in b) == ["eggplant", "red apple"]
    assert stats.skipped == {"not an emoji": 1, "blank svg": 1}
    red = np.asarray(a[0].image)
    assert a[0].is_glyph and red.shape[2] == 4 and red[..., 0].max() == 255 and red[..., 3].max() == 255


def test_missing_or_broken_iconify_set_names_its_path(tmp_path):
    with pytest.raises(SourceUnavailable, match="npm ci"):
        list(iconify_items(str(tmp_path / "nope" / "icons.json"), SourceStats()))
    (tmp_path / "icons.json").write_text('{"no": "icons"}')
    with pytest.raises(ValueError, match="not an Iconify icon set"):
        list(iconify_items(str(tmp_path / "icons.json"), SourceStats()))


def test_pairs_only_datasets_are_refused_as_generator_and_the_judge_never_shares_a_style():
    base = {"data": {"datasets": {"openmoji": {"source": "openmoji"}, "noto": {"source": "noto"},
                                  "tw": {"source": "iconify", "path": "x/icons.json", "pairs_only": True}}}}
    params = build_params(base, ["encoder.alignment.datasets=[noto]", "judge.alignment.datasets=[tw]"])
    assert params.judge.alignment.seed != params.encoder.alignment.seed
    assert params.judge.vision.width != params.encoder.vision.width
    with pytest.raises(ConfigError, match="share \\['noto'\\]"):
        build_params(base, ["encoder.alignment.datasets=[noto]", "judge.alignment.datasets=[noto,tw]"])
    styles = ["encoder.alignment.datasets=[noto]", "judge.alignment.datasets=[tw]"]
    for same_shape in (["judge.vision.tower=efficientnet_lite0", "encoder.vision.tower=efficientnet_lite0"],
                       ["judge.vision.tower=vit", "encoder.vision.tower=vit", "judge.vision.width=96",
                        "judge.vision.layers=3", "judge.vision.head_width=32", "judge.vision.image_size=64"]):
        with pytest.raises(ConfigError, match="'judge.vision' give both image towers the shape"):
            build_params(base, styles + same_shape)
    build_params(base, styles + ["judge.vision.tower=vit", "encoder.vision.tower=vit", "judge.vision.layers=4",
                                 "judge.vision.width=96", "judge.vision.head_width=32"])  # one size apart is enough
    with pytest.raises(ConfigError, match="pairs_only"):
        build_params(base, ["data.generator_dataset=tw"])
    with pytest.raises(ConfigError, match="needs a path"):
        build_params({"data": {"datasets": {"openmoji": {"source": "openmoji"}, "x": {"source": "iconify"}}}})


@pytest.fixture(scope="module")
def styled_repo(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline's ingest plus two rendered npm-like styles, ingested as pairs_only datasets."""
    root = copy_outputs(tiny_pipeline, tmp_path_factory.mktemp("styles") / "repo", str(paths.INGEST))
    store = ImageStore.open(root / paths.dataset_dir("openmoji"))
    captions = store.read_captions()
    held_out = sorted(set(captions.loc[store.rows("test")].dropna()))[:5]
    seen = sorted(set(captions.loc[store.rows("train")].dropna()) - set(held_out))[:15]
    data = DataConfig()
    for style, green in (("ink", 0), ("sky", 200)):
        names = [*held_out, *seen, "grinning face"]
        icons = {name.replace(" ", "-"): (3 + i % 5, f"#{10 * i:02x}{green:02x}80") for i, name in enumerate(names)}
        path = write_iconify_set(root / "sets" / style, icons)
        ingest_dataset(style, DatasetConfig(source=Source.iconify, path=str(path), pairs_only=True), data,
                       root / paths.dataset_dir(style))
    return root


def test_paired_corpus_joins_styles_and_still_drops_held_out_names(styled_repo, monkeypatch):
    monkeypatch.chdir(styled_repo)
    params = build_params({"data": {"datasets": {"openmoji": {}, "ink": {"source": "iconify", "path": "x"},
                                                 "sky": {"source": "iconify", "path": "x"}}}},
                          ["encoder.alignment.datasets=[ink,sky]", "judge.alignment.datasets=[]"])
    _, _, test_names = held_out_eval(params)
    corpus = paired_corpus(params, params.encoder, test_names)
    assert set(corpus.pairs["dataset"]) == {"ink", "sky"}
    assert len(corpus.images) == len(corpus.names) == len(corpus.pairs)
    assert not set(corpus.names) & {n for n in test_names if isinstance(n, str)}
    assert len(corpus.names) == 2 * (len(set(corpus.names)))  # every kept name, once per style
    assert "grinning face" in corpus.names and len(set(corpus.names)) >= 10
    assert embed.ingested_datasets() == ["noto", "openmoji"]  # pairs_only styles: never embedded or indexed
    for absent in ("[absent]", "[openmoji]"):  # not ingested, or the generator's own images: never paired
        with pytest.raises(ValueError, match="none is ingested"):
            paired_corpus(params, build_params(None, [f"encoder.alignment.datasets={absent}"]).encoder, test_names,
                          fallback=False)


def test_judge_pairs_retrieval_pairs_and_test_split_are_pairwise_disjoint(styled_repo, monkeypatch):
    monkeypatch.chdir(styled_repo)
    params = build_params({"data": {"datasets": {"openmoji": {}, "noto": {"source": "noto"},
                                                 "ink": {"source": "iconify", "path": "x"},
                                                 "sky": {"source": "iconify", "path": "x"}}}},
                          ["encoder.alignment.datasets=[noto,ink]", "judge.alignment.datasets=[sky]"])
    generator, test_rows, test_names = held_out_eval(params)
    test_hashes = generator.manifest["content_hash"].to_numpy()[test_rows]
    retrieval = paired_corpus(params, params.encoder, test_names).pairs
    judged = paired_corpus(params, params.judge, test_names).pairs
    paths.ENCODER.mkdir(parents=True, exist_ok=True)
    retrieval.to_parquet(paths.ENCODER / PAIRS, index=False)
    judge.check_independent(judged, test_hashes)  # the real corpora: disjoint
    check_disjoint({"judge": judged["content_hash"], "retrieval": retrieval["content_hash"], "test": test_hashes})

    # broken on purpose, each pair of sets in turn: the check names the two sets
    with pytest.raises(ValueError, match="judge pairs and test split share 1 image"):
        judge.check_independent(pd.concat([judged, pd.DataFrame({"content_hash": test_hashes[:1]})]), test_hashes)
    with pytest.raises(ValueError, match="judge pairs and retrieval encoder pairs share 2 image"):
        judge.check_independent(pd.concat([judged, retrieval[:2]]), test_hashes)
    pd.concat([retrieval, pd.DataFrame({"content_hash": test_hashes[:3]})]).to_parquet(paths.ENCODER / PAIRS)
    with pytest.raises(ValueError, match="test split and retrieval encoder pairs share 3 image"):
        judge.check_independent(judged, test_hashes)
