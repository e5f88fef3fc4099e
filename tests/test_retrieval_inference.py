"""Inference-time retrieval: index subsets and the global score filter as id selectors over the full
index; the per-query score quantile among each query's neighbours."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

from knn_diffusion.encoders.store import EmbeddingStore
from knn_diffusion.io import read_json, write_json
from knn_diffusion.retrieval.backends import LocalRoots, open_backend
from knn_diffusion.retrieval.build import build_tuned_index
from knn_diffusion.retrieval.config import IndexConfig, RetrievalConfig, ScoreFilterConfig
from knn_diffusion.retrieval.index import load_index, normalised
from knn_diffusion.retrieval.inference import (
    SCORES_FILE,
    allowed_ids,
    embeddings_facts,
    index_ids,
    open_neighbour_search,
)
from knn_diffusion.retrieval.scores import per_query_quantile, score_lookup
from knn_diffusion.retrieval.served import decode_vector
from knn_diffusion.retrieval.served_export import COLUMNS, SERVED_INDEX_FILE, export_index
from knn_diffusion.retrieval.subsets import subset_mask
from tests.embedding_helpers import write_clustered_store

N, D, K = 2_000, 32, 5


@pytest.fixture(scope="module", params=["Flat", "IVF16,PQ16x4fs,Refine(SQfp16)"])
def built(request, tmp_path_factory):
    """An embedding store of N vectors (ids not 0..N-1) and a full index over it with a score column."""
    root = tmp_path_factory.mktemp("inference")
    store = root / "embed"
    vectors, ids = write_clustered_store(store, N, D)
    config = IndexConfig(factory=request.param, tune_queries=50, train_size=1_000, use_gpu="never")
    build_tuned_index(vectors, ids, config, "enc", root / "index", progress=False)
    scores = np.random.default_rng(0).random(N).astype(np.float32)
    np.savez(root / "index" / SCORES_FILE, ids=ids, scores=scores)
    return root, vectors, ids, scores


def test_index_ids_lists_every_stored_id(built):
    root, _, ids, _ = built
    index, _ = load_index(root / "index")
    np.testing.assert_array_equal(np.sort(index_ids(index)), ids)


def test_subset_search_returns_k_ids_from_the_subset_only(built):
    root, vectors, ids, _ = built
    queries = vectors[::97]
    knn, sidecar = open_neighbour_search(root / "index", root / "embed", "enc", D,
                                         RetrievalConfig(index_fraction=0.3, subset_seed=0))
    found, scores, neighbours = knn(queries, K)
    subset = set(ids[subset_mask(ids, 0.3, 0)].tolist())
    assert found.shape == (len(queries), K) and neighbours.shape == (len(queries), K, D)
    assert set(found.ravel().tolist()) <= subset
    assert sidecar["index_fraction"] == 0.3 and sidecar["retrievable"] == len(subset)
    full, _ = open_neighbour_search(root / "index", root / "embed", "enc", D)
    assert not set(full(queries, K)[0].ravel().tolist()) <= subset  # the full index does retrieve outside it


def test_nested_subsets_and_global_score_filter_combine(built):
    root, vectors, ids, scores = built
    small = set(allowed_ids(ids, index_fraction=0.1).tolist())
    large = set(allowed_ids(ids, index_fraction=0.3).tolist())
    assert small < large and 0.05 < len(small) / N < 0.15  # the 10% subset lies inside the 30% one
    knn, sidecar = open_neighbour_search(root / "index", root / "embed", "enc", D, RetrievalConfig(
        index_fraction=0.1, global_score_filter=ScoreFilterConfig(low=0.5)))
    found = knn(vectors[:40], K)[0]
    top_half = set(ids[scores >= np.quantile(scores, 0.5)].tolist())
    assert set(found.ravel().tolist()) <= small & top_half
    assert sidecar["retrievable"] == len(small & top_half)
    with pytest.raises(ValueError, match=f"only {len(small & top_half)} images"):
        knn(vectors[:1], len(small & top_half) + 1)


def test_per_query_quantile_split_follows_a_planted_score_order():
    """Six neighbours per query, Q=3, k=2: each quantile holds the two with the planted scores' rank,
    returned in similarity order."""
    ids = np.array([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    similarity = np.linspace(1, 0.5, 6)[None].repeat(2, 0)  # best match first
    planted = np.array([[5, 0, 3, 1, 4, 2], [0, 1, 2, 3, 4, 5]], np.float32)  # score per neighbour
    low = per_query_quantile(ids, similarity, planted, 2, 1, 3)[0]
    high, high_similarity = per_query_quantile(ids, similarity, planted, 2, 3, 3)
    np.testing.assert_array_equal(low, [[11, 13], [20, 21]])
    np.testing.assert_array_equal(high, [[10, 14], [24, 25]])
    assert (np.diff(high_similarity, axis=1) <= 0).all()
    with pytest.raises(ValueError, match="expected 1..3"):
        per_query_quantile(ids, similarity, planted, 2, 4, 3)


def test_score_quantile_conditions_on_one_score_group_of_the_k_q_nearest(built):
    root, vectors, ids, scores = built
    queries = vectors[::211]
    nearest, _ = open_neighbour_search(root / "index", root / "embed", "enc", D)
    pool = nearest(queries, K * 4)[0]  # the k * Q nearest of each query
    score_of = dict(zip(ids.tolist(), scores.tolist()))
    means = []
    for quantile in (1, 4):
        knn, sidecar = open_neighbour_search(root / "index", root / "embed", "enc", D,
                                             RetrievalConfig(score_quantile=quantile, score_quantiles=4))
        found, similarity, vectors_found = knn(queries, K)
        assert found.shape == (len(queries), K) and vectors_found.shape == (len(queries), K, D)
        assert sidecar["score_quantile"] == [quantile, 4]
        for row, candidates in zip(found, pool):
            ranked = sorted(candidates.tolist(), key=score_of.get)  # ascending score
            assert set(row.tolist()) == set(ranked[(quantile - 1) * K:quantile * K])
        means.append(np.mean([score_of[i] for i in found.ravel().tolist()]))
    assert means[0] < means[1]
    with pytest.raises(ValueError, match="score_quantile=5"):
        open_neighbour_search(root / "index", root / "embed", "enc", D,
                              RetrievalConfig(score_quantile=5, score_quantiles=4))


def test_local_backend_returns_content_ids_and_refuses_another_encoder(built, tmp_path):
    """The backend the stages use (retrieval.backend=local) gives the same ids as the search it wraps,
    checks the encoder fingerprint before searching, and names the choices for an unknown backend."""
    root, vectors, ids, _ = built
    roots = LocalRoots(index=tmp_path / "index", embed=tmp_path / "embed", ingest=tmp_path / "ingest")
    for folder, target in ((roots.index, root / "index"), (roots.embed, root / "embed")):  # the stages' layout
        folder.mkdir()
        (folder / "index").symlink_to(target)
    backend = open_backend(RetrievalConfig(), roots, "enc", D)
    assert backend.has("index") and not backend.has("nowhere")
    neighbours = backend.open("index")
    direct, _ = open_neighbour_search(root / "index", root / "embed", "enc", D)
    np.testing.assert_array_equal(neighbours.knn(vectors[:20], K)[0], direct(vectors[:20], K)[0])
    assert set(neighbours.knn(vectors[:20], K)[0].ravel().tolist()) <= set(ids.tolist())
    assert neighbours.scores is not None
    with pytest.raises(ValueError, match="'enc'.*'other-encoder'"):
        open_backend(RetrievalConfig(), roots, "other-encoder", D).open("index")
    with pytest.raises(FileNotFoundError, match="index 'nowhere'"):
        backend.open("nowhere")
    with pytest.raises(FileNotFoundError, match="no ingested images"):
        neighbours.images(ids[:2])
    with pytest.raises(ValueError, match=r"retrieval.backend='http': expected one of \['local', 'served'\]"):
        open_backend(RetrievalConfig(backend="http"), roots, "enc", D)


def test_served_export_answers_by_position_with_the_content_ids_of_the_local_index(built, tmp_path):
    """What `clip-retrieval back` does with an export - search its index by position, read the metadata row
    of each position - gives the local backend's ids, embeddings and scores (the service itself:
    tests/test_served_live.py)."""
    root, vectors, ids, scores = built
    (tmp_path / "embed-root").mkdir()
    (tmp_path / "embed-root" / "index").symlink_to(root / "embed")  # the stages' layout: <embed root>/<dataset>
    indices = export_index(root / "index", tmp_path / "embed-root", tmp_path / "ingest-root", tmp_path / "served",
                           name="emoji")
    served = read_json(indices)["emoji"]
    index = faiss.read_index(str(Path(served["indice_folder"]) / SERVED_INDEX_FILE))
    table = pd.read_parquet(Path(served["indice_folder"]) / "metadata" / "0.parquet")
    assert served["columns_to_return"] == COLUMNS and not served["provide_aesthetic_embeddings"]
    queries = normalised(vectors[::97])
    _, positions = index.search(queries, K)
    local, _ = open_neighbour_search(root / "index", root / "embed", "enc", D)
    found, _, neighbours = local(queries, K)
    np.testing.assert_array_equal(table["content_id"].to_numpy()[positions], found)
    rows = table.iloc[positions.ravel()]
    np.testing.assert_array_equal(np.stack([decode_vector(v) for v in rows["embedding"]]),
                                  neighbours.reshape(-1, D))
    np.testing.assert_array_equal(rows["score"].to_numpy(), score_lookup(ids, scores)(found.ravel()))
    assert json.loads(table["facts"][0])["fingerprint"] == "enc" and "png" not in table  # no ingested images here


def test_an_index_refuses_another_embedding_store_than_its_own(built, tmp_path):
    """Ids only mean the same images in the embedding store the index was built from (the index stage records
    it): another clone's or an older one is refused before a search pairs ids with the wrong vectors."""
    root, vectors, _, _ = built
    store = EmbeddingStore.open(root / "embed")
    for recorded, refused in ((embeddings_facts(store), False), ({**embeddings_facts(store), "ids_sha256": "x"}, True)):
        shutil.rmtree(tmp_path / "index", ignore_errors=True)
        shutil.copytree(root / "index", tmp_path / "index")
        write_json(tmp_path / "index" / "index.json", {**read_json(tmp_path / "index" / "index.json"),
                                                       "embeddings": recorded})
        if refused:
            with pytest.raises(ValueError, match="another ingest or embed run"):
                open_neighbour_search(tmp_path / "index", root / "embed", "enc", D)
        else:
            open_neighbour_search(tmp_path / "index", root / "embed", "enc", D)[0](vectors[:3], K)
