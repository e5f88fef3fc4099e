"""The sharded index build (retrieval/sharded.py) on a 2-worker Dask LocalCluster: the same inverted lists,
neighbours and distances as adding every vector in one process to the same trained index, and the merged
on-disk index searched memory-mapped through the project's own path (content ids, fingerprint, checksums)."""

from __future__ import annotations

import os
import shutil
import stat

import faiss
import numpy as np
import pytest

from knn_diffusion.encoders.store import begin_embedding, emb_name, finish_embedding, ids_name
from knn_diffusion.io import save_npy
from knn_diffusion.retrieval.config import IndexConfig, RetrievalConfig
from knn_diffusion.retrieval.index import load_index, normalised, train_index
from knn_diffusion.retrieval.inference import embeddings_facts, index_ids, open_neighbour_search
from knn_diffusion.retrieval.search import exact_neighbours, recall_at_k, vectors_by_id
from knn_diffusion.retrieval.served_export import by_position
from knn_diffusion.retrieval.sharded import (
    IVFDATA_FILE,
    StoreRows,
    add_shards,
    build_sharded_index,
    dask_client,
    merge_on_disk,
    sharded_factory,
)
from knn_diffusion.retrieval.synthetic import QUERIES, clustered_vectors

N, D, SHARD = 4_000, 32, 1_000
FACTORY = "IVF32,PQ16x4fs,Refine(SQfp16)"  # the large-set default's shape, test-sized
MEMORY_LIMIT = "400MB"  # per worker: a few times a bare worker's RSS, far below what the nanny allows by default


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A float16 embedding store (4 files of 1000 rows; ids are not positions), and the positions indexed:
    every row but each 7th, as the generator's split leaves gaps."""
    root = tmp_path_factory.mktemp("sharded") / "embed"
    vectors = clustered_vectors(N, D, n_clusters=40, noise=0.6, seed=5)
    ids = np.arange(N, dtype=np.int64) * 3 + 1
    for shard in begin_embedding(root, "enc", D, ids, SHARD, "float16"):
        save_npy(root / emb_name(shard), vectors[shard * SHARD:(shard + 1) * SHARD].astype(np.float16))
        save_npy(root / ids_name(shard), ids[shard * SHARD:(shard + 1) * SHARD])
    store = finish_embedding(root)
    positions = np.flatnonzero(np.arange(N) % 7 != 0)
    return store, positions


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      memory_limit=MEMORY_LIMIT) as local:
        yield local


def test_sharded_factory_keeps_the_codes_and_drops_what_cannot_live_on_disk():
    assert sharded_factory(FACTORY) == "IVF32,PQ16x4"
    assert sharded_factory("IVF1024_HNSW32,PQ256x4fs,Refine(SQfp16)") == "IVF1024_HNSW32,PQ256x4"
    assert sharded_factory("OPQ16,IVF64,PQ16") == "OPQ16,IVF64,PQ16"
    assert sharded_factory("Flat") is None and sharded_factory("HNSW32") is None


def test_store_rows_reads_positions_like_the_store(store):
    store, positions = store
    rows = StoreRows.of_store(store, positions)
    assert rows.shape == (len(positions), D) and len(rows) == len(positions)
    picked = np.array([5, 0, 2_500, len(positions) - 1])
    np.testing.assert_array_equal(rows[picked], store.get(positions[picked]))
    np.testing.assert_array_equal(rows[10:1_200], store.get(positions[10:1_200]))


def test_shards_merged_on_disk_equal_the_one_process_build(store, cluster, tmp_path):
    store, positions = store
    rows, ids = StoreRows.of_store(store, positions), store.ids[positions]
    trained, _, _ = train_index(rows, sharded_factory(FACTORY), train_size=2_000, use_gpu="never")
    single = faiss.clone_index(trained)
    single.add_with_ids(normalised(rows[:]), ids)

    work = tmp_path / "work"
    work.mkdir()
    faiss.write_index(trained, str(work / "trained.faiss"))
    with dask_client(0, cluster.scheduler_address) as client:
        shard_paths, workers = add_shards(client, rows, ids, work, n_shards=3, batch=400)  # 3 uneven slices
    peaks = workers["peak_rss_bytes"]
    assert len(shard_paths) == 3 and len(peaks) == 2 and all(0 < v < 400e6 for v in peaks.values())
    assert workers["restarted_workers"] == 0
    merged = merge_on_disk(work / "trained.faiss", shard_paths, tmp_path / IVFDATA_FILE)
    on_disk = faiss.downcast_InvertedLists(faiss.extract_index_ivf(merged).invlists)
    assert isinstance(on_disk, faiss.OnDiskInvertedLists) and on_disk.filename == IVFDATA_FILE
    assert merged.ntotal == single.ntotal == len(ids)

    a, b = faiss.extract_index_ivf(single).invlists, on_disk
    for lst in range(a.nlist):  # every list: the same ids and codes, in the same order
        size = a.list_size(lst)
        assert b.list_size(lst) == size
        if size == 0:
            continue
        np.testing.assert_array_equal(faiss.rev_swig_ptr(a.get_ids(lst), size),
                                      faiss.rev_swig_ptr(b.get_ids(lst), size))
        np.testing.assert_array_equal(faiss.rev_swig_ptr(a.get_codes(lst), size * a.code_size),
                                      faiss.rev_swig_ptr(b.get_codes(lst), size * a.code_size))
    queries = clustered_vectors(100, D, n_clusters=40, noise=0.6, seed=5, stream=QUERIES)
    for nprobe in (1, 4, 32):
        single.nprobe = merged.nprobe = nprobe
        want_scores, want_ids = single.search(queries, 10)
        got_scores, got_ids = merged.search(queries, 10)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_scores, want_scores)


def test_sharded_index_is_searched_memory_mapped_through_the_project_path(store, cluster, tmp_path):
    store, positions = store
    ids = store.ids[positions]
    config = IndexConfig(factory=FACTORY, train_size=2_000, tune_queries=100, use_gpu="never")
    sidecar, report = build_sharded_index(StoreRows.of_store(store, positions), ids, config, "enc",
                                          tmp_path / "index", workers=2, address=cluster.scheduler_address,
                                          batch=700, get_vectors=vectors_by_id(store.ids, store.get),
                                          embeddings=embeddings_facts(store))
    assert sidecar["factory"] == "IVF32,PQ16x4" and sidecar["requested_factory"] == FACTORY
    assert sidecar["recall"]["reached"] and sidecar["ivfdata"]["file"] == IVFDATA_FILE
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["index.faiss", "index.ivfdata", "index.json"]
    assert report["shards"] == 2 and len(report["peak_rss_bytes"]) == 2

    # a moved, read-only copy (DVC's cache) opens: the data file is found beside index.faiss
    moved = tmp_path / "elsewhere" / "index"
    shutil.copytree(tmp_path / "index", moved)
    for path in moved.iterdir():
        os.chmod(path, stat.S_IRUSR)
    shutil.rmtree(tmp_path / "index")
    index, _ = load_index(moved, "enc", D)
    np.testing.assert_array_equal(np.sort(index_ids(index)), np.sort(ids))

    queries = clustered_vectors(50, D, n_clusters=40, noise=0.6, seed=5, stream=QUERIES)
    _, truth = exact_neighbours(store.get(positions), ids, queries, 5)
    knn, _ = open_neighbour_search(moved, store.root, "enc", D)
    found, scores, neighbours = knn(queries, 5)
    # content ids of indexed images; the tuner's 0.95 is for indexed images at k=10, these are held out
    assert set(found.ravel().tolist()) <= set(ids.tolist()) and recall_at_k(found, truth, 5) >= 0.8
    np.testing.assert_array_equal(neighbours, store.get(store.positions_of(found.ravel())).reshape(50, 5, D))
    exact = np.einsum("qkd,qd->qk", normalised(neighbours.reshape(-1, D)).reshape(50, 5, D), normalised(queries))
    np.testing.assert_allclose(scores, exact, atol=1e-5)  # re-ranked against the store: exact cosines
    subset, _ = open_neighbour_search(moved, store.root, "enc", D, RetrievalConfig(index_fraction=0.3))
    assert subset(queries, 5)[0].shape == (50, 5)

    with pytest.raises(ValueError, match="fingerprint"):
        load_index(moved, "another encoder", D)
    with pytest.raises(ValueError, match="stores its ids in its lists"):  # what the served backend cannot serve
        by_position(*load_index(moved), moved)
    damaged = tmp_path / "damaged"
    shutil.copytree(moved, damaged)
    os.chmod(damaged / IVFDATA_FILE, stat.S_IRUSR | stat.S_IWUSR)
    with open(damaged / IVFDATA_FILE, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00" * 8 if fh.read(8) != b"\x00" * 8 else b"\x01" * 8)
    with pytest.raises(ValueError, match="index.ivfdata: sha256 differs"):
        load_index(damaged)
    os.truncate(damaged / IVFDATA_FILE, 64)
    with pytest.raises(ValueError, match="index.ivfdata: 64 bytes"):
        load_index(damaged)


def test_index_stage_builds_sharded_and_the_knn_stage_reads_it(tiny_pipeline, tmp_path, monkeypatch):
    """``index.shard_workers`` in params: the index stage builds on a 2-worker LocalCluster, the knn stage
    searches the merged on-disk index (the tiny pipeline's ingest and embeddings, copied)."""
    import yaml

    from knn_diffusion.io import read_json
    from knn_diffusion.stages import index, knn, paths
    from tests.conftest import copy_outputs

    root = copy_outputs(tiny_pipeline, tmp_path / "repo", "data/ingest", "data/embed")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["index"] = {**params.get("index", {}), "factory": "IVF2,PQ16x4fs,Refine(SQfp16)", "shard_workers": 2,
                       "shard_memory_limit": MEMORY_LIMIT}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    index.main([])
    knn.main([])
    sidecar = read_json(root / paths.index_dir("openmoji") / "index.json")
    assert sidecar["factory"] == "IVF2,PQ16x4" and sidecar["ivfdata"]["file"] == IVFDATA_FILE
    assert (root / paths.index_dir("openmoji") / IVFDATA_FILE).is_file()
    table = np.load(root / paths.neighbours_file("openmoji"))
    assert table["ids"].shape == (len(table["rows"]), 10) and (table["ids"] != table["rows"][:, None]).all()
