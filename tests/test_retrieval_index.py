"""Index choice, build, tuning, save/load and the checks that refuse a wrong or damaged index."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from knn_diffusion.io import read_json, write_json
from knn_diffusion.retrieval.build import build_tuned_index
from knn_diffusion.retrieval.config import IndexConfig
from knn_diffusion.retrieval.index import (
    INDEX_FILE,
    SIDECAR_FILE,
    build_index,
    choose_factory,
    gpu_available,
    index_bytes_per_vector,
    load_index,
    save_index,
)
from knn_diffusion.retrieval.search import Searcher, exact_neighbours, recall_at_k, tune_search_params, vectors_by_id
from knn_diffusion.retrieval.synthetic import QUERIES, clustered_vectors

D = 32
FACTORY = "IVF64,PQ32x4fs"  # the default's shape (IVF, one 4-bit sub-quantizer per dim), test-sized


@pytest.fixture(scope="module")
def data():
    vectors = clustered_vectors(8_000, D, n_clusters=40, noise=0.6, seed=3)
    ids = np.arange(len(vectors), dtype=np.int64) * 7 + 11  # ids are not positions
    queries = clustered_vectors(200, D, n_clusters=40, noise=0.6, seed=3, stream=QUERIES)
    _, truth = exact_neighbours(vectors, ids, queries, 10)
    return vectors, ids, queries, truth


@pytest.fixture(scope="module")
def ivf(data):
    vectors, ids, _, _ = data
    index, info = build_index(vectors, ids, FACTORY, train_size=4_000, use_gpu="never", progress=False)
    return index, info


def test_factory_by_size_and_budget():
    assert choose_factory(4_500, 512) == "Flat"  # OpenMoji-sized: exact
    assert choose_factory(10_000_000, 512, bytes_per_vector=4096) == "Flat"  # budget holds float32
    # codes of at most d / 4 bytes, and a float16 re-rank store
    assert choose_factory(1_000_000, 512, 256) == "IVF1024,PQ256x4fs,Refine(SQfp16)"
    assert choose_factory(1_000_000, 512, 64) == "IVF1024,PQ128x4fs,Refine(SQfp16)"
    assert choose_factory(500_000_000, 512, 256).startswith("IVF16384_HNSW32,")  # big: HNSW quantizer
    for n, budget in [(200_000, 256), (3_000_000, 128)]:  # every choice is a valid factory string
        assert faiss.index_factory(512, choose_factory(n, 512, budget), faiss.METRIC_INNER_PRODUCT).d == 512
    with pytest.raises(ValueError, match="n >= 1"):
        choose_factory(0, 512)


def test_build_keeps_ids_and_reports_cpu(data, ivf):
    vectors, ids, _, _ = data
    index, info = ivf
    assert (info.factory, info.n, info.d, info.device) == (FACTORY, len(ids), D, "cpu")
    _, found = index.search(vectors[:5], 1)
    assert set(found[:, 0]) <= set(ids.tolist())
    memory = index_bytes_per_vector(index)
    # PQ32x4fs: 16 bytes of codes + 8 of id, plus the padding of fast-scan lists to 32-code blocks.
    assert 16 + 8 <= memory["codes_and_ids"] < 16 + 8 + 3
    with pytest.raises(ValueError, match="not unique"):
        build_index(vectors[:10], np.zeros(10, np.int64), "Flat", progress=False)
    with pytest.raises(ValueError, match="not valid"):
        build_index(vectors[:10], ids[:10], "IVF7,Nonsense", progress=False)


def test_tuning_reaches_target_with_smallest_nprobe(data, ivf):
    vectors, ids, queries, truth = data
    index, _ = ivf
    searcher = Searcher(index, get_vectors=vectors_by_id(ids, vectors), rerank_factor=8)
    params, recall = tune_search_params(searcher, queries, truth, k=10, target_recall=0.95)
    assert recall >= 0.95
    assert recall_at_k(searcher.search(queries, 10).ids, truth, 10) == pytest.approx(recall)
    if params["nprobe"] > 1:  # one probe fewer misses the target
        lower = Searcher(index, {"nprobe": params["nprobe"] - 1}, get_vectors=searcher.get_vectors,
                         rerank_factor=searcher.rerank_factor)
        assert recall_at_k(lower.search(queries, 10).ids, truth, 10) < 0.95
    # Re-ranking is what gets past the recall cap of the PQ codes.
    plain = Searcher(index, params)
    assert recall_at_k(plain.search(queries, 10).ids, truth, 10) < recall


def test_refine_index_reranks_from_its_memory_mapped_store(tmp_path, data):
    """The large-set default: faiss re-ranks against the index's own float16 store, which load_index
    maps from disk; content ids (not row positions) come back, and id selectors still apply."""
    vectors, ids, queries, truth = data
    index, info = build_index(vectors, ids, "IVF64,PQ16x4fs,Refine(SQfp16)", train_size=4_000,
                              use_gpu="never", progress=False)
    memory = index_bytes_per_vector(index)
    # 8 B of codes, 8 B of IVF row ids, 8 B of the id table, fast-scan padding; the store apart
    assert 8 + 16 <= memory["codes_and_ids"] < 8 + 16 + 3 and memory["rerank_store"] == 2 * D
    searcher = Searcher(index, rerank_factor=8)
    params, recall = tune_search_params(searcher, queries, truth, k=10, target_recall=0.9)
    assert recall >= 0.9 and searcher.refines and not searcher.exact_scores
    assert recall > recall_at_k(Searcher(index, params, rerank_factor=1).search(queries, 10).ids, truth, 10)
    save_index(index, tmp_path / "idx", {"fingerprint": "enc-a", "search_params": params,
                                         "rerank_factor": searcher.rerank_factor})
    loaded = Searcher.open(tmp_path / "idx", "enc-a", D)  # the re-rank factor from the sidecar
    assert loaded.rerank_factor == searcher.rerank_factor
    found = loaded.search(queries, 10)
    np.testing.assert_array_equal(found.ids, searcher.search(queries, 10).ids)
    assert np.isin(found.ids, ids).all()
    allowed = ids[::3]
    filtered = loaded.search(queries, 10, selector=faiss.IDSelectorBatch(allowed)).ids
    assert np.isin(filtered, allowed).all()


def test_tuning_lowers_hnsw_quantizer_ef(data):
    vectors, ids, queries, truth = data
    index, _ = build_index(vectors, ids, "IVF64_HNSW16,PQ32x4fs", train_size=4_000, progress=False)
    searcher = Searcher(index, get_vectors=vectors_by_id(ids, vectors), rerank_factor=8)
    params, recall = tune_search_params(searcher, queries, truth, k=10, target_recall=0.95)
    assert recall >= 0.95 and params["nprobe"] <= params["quantizer_efSearch"] < 64
    assert searcher.search_params == params and 1 <= searcher.rerank_factor <= 8


def test_save_load_roundtrip_identical(tmp_path, data, ivf):
    vectors, ids, queries, _ = data
    index, info = ivf
    before = Searcher(index, {"nprobe": 4}).search(queries, 10)
    meta = save_index(index, tmp_path / "idx", {"fingerprint": "enc-a", "factory": info.factory})
    assert (tmp_path / "idx" / INDEX_FILE).is_file() and meta["ntotal"] == len(ids)
    for mmap in (True, False):
        loaded, sidecar = load_index(tmp_path / "idx", "enc-a", D, mmap=mmap)
        after = Searcher(loaded, {"nprobe": 4}).search(queries, 10)
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_array_equal(after.scores, before.scores)
    assert sidecar["sha256"] == meta["sha256"]
    # The index file path itself is accepted too (index swap points at any compatible index).
    assert load_index(tmp_path / "idx" / INDEX_FILE)[0].ntotal == len(ids)


def test_fingerprint_and_dimension_mismatch_refused(tmp_path, data, ivf):
    save_index(ivf[0], tmp_path / "idx", {"fingerprint": "enc-a"})
    with pytest.raises(ValueError, match="'enc-a'.*'enc-b'"):
        load_index(tmp_path / "idx", expected_fingerprint="enc-b")
    with pytest.raises(ValueError, match=f"{D}-d vectors, expected 512-d"):
        load_index(tmp_path / "idx", expected_dim=512)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "no_sidecar"])
def test_damaged_index_file_gives_clear_error(tmp_path, ivf, damage):
    directory = tmp_path / "idx"
    save_index(ivf[0], directory, {"fingerprint": "enc-a"})
    path = directory / INDEX_FILE
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 3])
    elif damage == "flip":
        path.write_bytes(raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:])
    elif damage == "garbage":
        path.write_bytes(b"\0" * len(raw))
    else:
        (directory / SIDECAR_FILE).unlink()
    with pytest.raises(ValueError, match=str(directory)):
        load_index(directory)


def test_faiss_parse_error_is_a_value_error(tmp_path, ivf):
    """A file that passes the sidecar checks but is not an index still fails cleanly."""
    directory = tmp_path / "idx"
    save_index(ivf[0], directory, {"fingerprint": "enc-a"})
    (directory / INDEX_FILE).write_bytes(b"not an index at all")
    meta = read_json(directory / SIDECAR_FILE)
    write_json(directory / SIDECAR_FILE, {**meta, "bytes": (directory / INDEX_FILE).stat().st_size})
    with pytest.raises(ValueError, match="faiss cannot read it"):
        load_index(directory, verify_checksum=False)


def test_build_tuned_index_for_a_small_collection(tmp_path, data):
    vectors, ids, _, _ = data
    config = IndexConfig(tune_queries=100, target_recall=0.99, use_gpu="never")
    meta = build_tuned_index(vectors[:3_000], ids[:3_000], config, "enc-a", tmp_path / "idx", progress=False)
    assert meta["factory"] == "Flat" and meta["recall"]["reached"] and meta["rerank_factor"] == 1
    assert meta["ntotal"] == 3_000  # always the full collection: subsets are an inference setting
    build_tuned_index(vectors[:3_000], ids[:3_000], config, "enc-a", tmp_path / "again", progress=False)
    assert "build_seconds" not in meta  # run-varying values stay out of the DVC out
    assert (tmp_path / "idx" / "index.json").read_bytes() == (tmp_path / "again" / "index.json").read_bytes()


def test_gpu_auto_falls_back_to_cpu(data):
    vectors, ids, _, _ = data
    _, info = build_index(vectors[:500], ids[:500], "Flat", use_gpu="auto", progress=False)
    assert info.device == ("cuda:0" if gpu_available() else "cpu")
    if gpu_available():
        return
    with pytest.raises(RuntimeError, match="use_gpu='always'"):
        build_index(vectors[:500], ids[:500], "Flat", use_gpu="always", progress=False)


def test_gpu_build_matches_cpu(data):
    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss has no GPU support (faiss-cpu installed)")
    if not gpu_available():
        pytest.skip("no GPU visible")
    vectors, ids, queries, truth = data
    index, info = build_index(vectors, ids, FACTORY, train_size=4_000, use_gpu="always", progress=False)
    assert info.device == "cuda:0"
    searcher = Searcher(index, {"nprobe": 16}, get_vectors=vectors_by_id(ids, vectors), rerank_factor=8)
    assert recall_at_k(searcher.search(queries, 10).ids, truth, 10) >= 0.9
