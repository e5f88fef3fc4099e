"""Embedding store: format, resumable byte-identical embedding, compatibility checks, clip-retrieval import."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from knn_diffusion.encoders.factory import load_open_clip
from knn_diffusion.encoders.store import (
    META_FILE,
    METADATA_FILE,
    PROGRESS_FILE,
    EmbeddingStore,
    emb_name,
    embed_collection,
    ids_name,
    import_clip_retrieval,
    load_text_embeddings,
    save_text_embeddings,
)

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "tiny-store-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    return load_open_clip(str(path))


@pytest.fixture(scope="module")
def collection():
    """50 images; the store embeds 37 of them in a shuffled order (ids are rows of the collection)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 16, 16, 3), dtype=np.uint8)
    ids = rng.permutation(50)[:37].astype(np.int64)
    return images, ids


def files(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def embed(encoder, collection, out, **kwargs):
    images, ids = collection
    return embed_collection(encoder, images, ids, out, shard_size=16, batch_size=8, **kwargs)


def test_store_holds_unit_rows_in_id_order(encoder, collection, tmp_path):
    images, ids = collection
    store = embed(encoder, collection, tmp_path / "emb", dtype="float16")
    assert len(store) == 37 and store.dim == 16 and store.fingerprint == encoder.fingerprint
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == [
        "emb-00000.npy", "emb-00001.npy", "emb-00002.npy", "ids-00000.npy", "ids-00001.npy", "ids-00002.npy",
        META_FILE]
    meta = json.loads((tmp_path / "emb" / META_FILE).read_text())
    assert {k: meta[k] for k in ("dim", "dtype", "count", "shard_size", "num_shards")} == {
        "dim": 16, "dtype": "float16", "count": 37, "shard_size": 16, "num_shards": 3}
    assert np.load(tmp_path / "emb" / emb_name(0)).dtype == np.float16
    np.testing.assert_array_equal(store.ids, ids)
    vectors = store.vectors()
    assert vectors.dtype == np.float32 and vectors.shape == (37, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)
    expected = encoder.encode_images(images[ids])
    np.testing.assert_allclose(vectors, expected, atol=2e-3)
    np.testing.assert_array_equal(store.get([36, 0, 17]), vectors[[36, 0, 17]])
    with pytest.raises(IndexError, match=r"\[0, 37\)"):
        store.get([37])


def test_float32_store_matches_the_encoder_exactly(encoder, collection, tmp_path):
    images, ids = collection
    store = embed(encoder, collection, tmp_path / "emb", dtype="float32")
    np.testing.assert_array_equal(store.vectors(), encoder.encode_images(images[ids], batch_size=8))


def test_interrupted_run_resumes_to_byte_identical_files(encoder, collection, tmp_path):
    straight = tmp_path / "straight"
    embed(encoder, collection, straight)

    def stop_in_second_shard(done, total):
        if done >= 24:
            raise KeyboardInterrupt
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        embed(encoder, collection, resumed, on_progress=stop_in_second_shard)
    assert not (resumed / META_FILE).exists() and (resumed / PROGRESS_FILE).exists()
    assert (resumed / ids_name(0)).exists() and not (resumed / ids_name(1)).exists()
    progress = []
    embed(encoder, collection, resumed, on_progress=lambda done, total: progress.append(done))
    assert progress[0] == 16 + 8                           # shard 0 was kept, not recomputed
    assert files(resumed) == files(straight)


def test_truncated_shard_and_missing_meta_are_recomputed(encoder, collection, tmp_path):
    out = tmp_path / "emb"
    embed(encoder, collection, out)
    reference = files(out)
    last = out / emb_name(2)
    last.write_bytes(last.read_bytes()[:100])
    (out / META_FILE).unlink()
    embed(encoder, collection, out)
    assert files(out) == reference


def test_a_different_encoder_discards_old_shards(encoder, collection, tmp_path):
    out = tmp_path / "emb"
    embed(encoder, collection, out)
    other = load_open_clip(encoder.description["model_name"])   # fresh random weights
    store = embed(other, collection, out)
    assert store.fingerprint == other.fingerprint != encoder.fingerprint
    images, ids = collection
    np.testing.assert_allclose(store.vectors(), other.encode_images(images[ids]), atol=2e-3)


def test_mismatched_fingerprint_or_dim_is_refused_naming_both(encoder, collection, tmp_path):
    store = embed(encoder, collection, tmp_path / "emb")
    store.check_compatible(encoder.fingerprint, 16)
    with pytest.raises(ValueError) as err:
        store.check_compatible("f" * 64, 16)
    assert encoder.fingerprint in str(err.value) and "f" * 64 in str(err.value)
    with pytest.raises(ValueError, match="dim 16 but the configured encoder has dim 512"):
        store.check_compatible(encoder.fingerprint, 512)


def test_unfinished_store_does_not_open(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing or unfinished"):
        EmbeddingStore.open(tmp_path)


def write_clip_retrieval(root, sizes, dim=8, seed=0):
    """clip-retrieval's output layout, with part numbers that sort wrongly as strings (0, 1, ..., 10)."""
    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    chunks = []
    for part, size in sizes.items():
        emb = rng.normal(size=(size, dim)).astype(np.float16)
        np.save(root / "img_emb" / f"img_emb_{part}.npy", emb)
        pd.DataFrame({"image_path": [f"{part}/{i}.jpg" for i in range(size)],
                      "caption": [f"caption {part}.{i}" for i in range(size)],
                      "key": np.arange(size) + 1000 * part}).to_parquet(root / "metadata" / f"metadata_{part}.parquet")
        chunks.append(emb)
    return np.concatenate(chunks).astype(np.float32)


def test_clip_retrieval_layout_imports_in_numeric_part_order(tmp_path):
    src = tmp_path / "laion"
    sizes = {0: 5, 1: 7} | {part: 1 for part in range(2, 11)}   # 21 rows in 11 parts
    raw = write_clip_retrieval(src, sizes)
    store = import_clip_retrieval(src, tmp_path / "emb", fingerprint="a" * 64, dim=8, shard_size=4, dtype="float32")
    assert len(store) == 21 and store.meta["num_shards"] == 6 and store.fingerprint == "a" * 64
    np.testing.assert_allclose(store.vectors(), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(store.ids, np.arange(21))
    metadata = pd.read_parquet(tmp_path / "emb" / METADATA_FILE)
    assert metadata["caption"].tolist()[12:15] == ["caption 2.0", "caption 3.0", "caption 4.0"]

    keyed = import_clip_retrieval(src, tmp_path / "keyed", fingerprint="a" * 64, id_column="key",
                                  keep_metadata=False)
    assert keyed.ids[:7].tolist() == [0, 1, 2, 3, 4, 1000, 1001] and keyed.ids[-1] == 10000
    with pytest.raises(ValueError, match="dim 8 but the configured encoder has dim 512"):
        import_clip_retrieval(src, tmp_path / "bad", fingerprint="a" * 64, dim=512)


def test_clip_retrieval_rows_must_match_metadata(tmp_path):
    src = tmp_path / "laion"
    write_clip_retrieval(src, {0: 3})
    pd.DataFrame({"caption": ["only one"]}).to_parquet(src / "metadata" / "metadata_0.parquet")
    with pytest.raises(ValueError, match=r"img_emb_0.npy: shape \(3, 8\) does not match 1 rows"):
        import_clip_retrieval(src, tmp_path / "emb", fingerprint="a" * 64)


def test_text_embeddings_roundtrip_and_refuse_other_encoders(encoder, tmp_path):
    captions = ["a red heart", "a cat face"]
    vectors = save_text_embeddings(encoder, captions, tmp_path / "captions.npy")
    loaded, texts = load_text_embeddings(tmp_path / "captions.npy", encoder.fingerprint, encoder.dim)
    assert texts == captions
    np.testing.assert_array_equal(loaded, vectors)
    np.testing.assert_allclose(np.linalg.norm(loaded, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="b" * 64):
        load_text_embeddings(tmp_path / "captions.npy", "b" * 64, encoder.dim)


def test_positions_of_maps_image_rows_and_refuses_missing_ones(encoder, collection, tmp_path):
    images, _ = collection
    rows = np.array([5, 2, 7, 0], dtype=np.int64)  # a store over some rows, in another order
    store = embed_collection(encoder, images, rows, tmp_path / "s", shard_size=3)
    assert store.positions_of([0, 5, 7]).tolist() == [3, 0, 2]
    with pytest.raises(ValueError, match="2 image rows have no embedding"):
        store.positions_of([1, 99])
