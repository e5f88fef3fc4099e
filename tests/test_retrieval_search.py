"""Searcher (filters, re-ranking, neighbour embeddings) and the training-neighbour table."""

from __future__ import annotations

import numpy as np
import pytest

from knn_diffusion.retrieval.index import build_index
from knn_diffusion.retrieval.neighbours import training_neighbours
from knn_diffusion.retrieval.scores import quantile_ids, quantile_selector
from knn_diffusion.retrieval.search import Searcher, exact_neighbours, recall_at_k, vectors_by_id
from knn_diffusion.retrieval.synthetic import QUERIES, clustered_vectors

D = 32


@pytest.fixture(scope="module")
def data():
    vectors = clustered_vectors(6_000, D, n_clusters=30, noise=0.6, seed=5)
    ids = np.arange(len(vectors), dtype=np.int64)[::-1] * 3 + 100  # ids in no particular order
    queries = clustered_vectors(100, D, n_clusters=30, noise=0.6, seed=5, stream=QUERIES)
    scores = np.random.default_rng(0).random(len(ids)).astype(np.float32)  # a per-image score column
    return vectors, ids, queries, scores


@pytest.fixture(scope="module", params=["Flat", "IVF32,PQ32x4fs", "OPQ16_32,IVF32_HNSW16,PQ32x4fs"])
def searcher(request, data):
    vectors, ids, _, _ = data
    index, _ = build_index(vectors, ids, request.param, train_size=3_000, progress=False)
    rerank = 1 if request.param == "Flat" else 10
    params = {"Flat": {}, "IVF32,PQ32x4fs": {"nprobe": 4}}.get(request.param,
                                                               {"nprobe": 4, "quantizer_efSearch": 16})
    return Searcher(index, params,
                    get_vectors=vectors_by_id(ids, vectors), rerank_factor=rerank)


def test_vectors_by_id_gathers_in_requested_order(data):
    vectors, ids, _, _ = data
    get = vectors_by_id(ids, vectors)
    wanted = ids[[5, 0, 5, 4_000]]
    np.testing.assert_array_equal(get(wanted), vectors[[5, 0, 5, 4_000]])
    from_callable = vectors_by_id(ids, lambda positions: vectors[positions])
    np.testing.assert_array_equal(from_callable(wanted), vectors[[5, 0, 5, 4_000]])
    with pytest.raises(KeyError, match="not in the embedding table"):
        get(np.array([1]))


def test_search_returns_ids_scores_and_neighbour_embeddings(data, searcher):
    vectors, ids, queries, _ = data
    found = searcher.search(queries, 10, return_vectors=True)
    assert found.ids.shape == (100, 10) and found.ids.dtype == np.int64
    assert found.scores.dtype == np.float32 and (np.diff(found.scores, axis=1) <= 1e-6).all()
    assert found.vectors.shape == (100, 10, D)
    np.testing.assert_allclose(np.einsum("nkd,nd->nk", found.vectors, queries), found.scores, atol=1e-5)
    _, truth = exact_neighbours(vectors, ids, queries, 10)
    assert recall_at_k(found.ids, truth, 10) >= 0.95
    with pytest.raises(ValueError, match="dimension 5"):
        searcher.search(np.ones((2, 5), np.float32), 10)


@pytest.mark.parametrize("low, high", [(0.0, 0.2), (0.4, 0.6), (0.8, 1.0), (0.95, 1.0)])
def test_quantile_filter_returns_k_in_range_ids(data, searcher, low, high):
    _, ids, queries, scores = data
    allowed = set(quantile_ids(scores, ids, low, high).tolist())
    assert len(allowed) == pytest.approx((high - low) * len(ids), abs=2)
    found = searcher.search(queries, 10, selector=quantile_selector(scores, ids, low, high))
    assert (found.ids >= 0).all()  # still k per query, none missing
    assert set(found.ids.ravel().tolist()) <= allowed
    # The filtered results are the best allowed images, not unfiltered results thinned out.
    unfiltered = searcher.search(queries, 10)
    assert (found.scores[:, 0] <= unfiltered.scores[:, 0] + 1e-6).all()


def test_quantile_range_edges(data):
    _, ids, _, scores = data
    top = quantile_ids(scores, ids, 0.9, 1.0)
    assert ids[scores.argmax()] in top  # high=1 keeps the maximum
    assert ids[scores.argmin()] not in top
    with pytest.raises(ValueError, match="0 <= low < high <= 1"):
        quantile_ids(scores, ids, 0.5, 0.5)


def test_filter_with_too_few_allowed_ids_fails_clearly(data, searcher):
    _, ids, queries, scores = data
    few = quantile_selector(scores[:5], ids[:5], 0.0, 1.0)
    with pytest.raises(ValueError, match="fewer than k=10"):
        searcher.search(queries[:3], 10, selector=few)


def test_training_neighbours_exclude_self_and_duplicates(data):
    vectors, ids, _, _ = data
    vectors = vectors.copy()
    vectors[1] = vectors[0]  # the same embedding stored twice
    hashes = np.zeros(ids.max() + 1, dtype=np.int64)
    hashes[ids] = np.arange(len(ids))
    hashes[ids[7]] = hashes[ids[8]]  # the same picture under two ids (different embeddings)
    index, _ = build_index(vectors, ids, "IVF32,PQ32x4fs", train_size=3_000, progress=False)
    searcher = Searcher(index, {"nprobe": 4}, get_vectors=vectors_by_id(ids, vectors), rerank_factor=5)
    nbr_ids, nbr_scores = training_neighbours(searcher, vectors, ids, 12, hashes, batch_size=1_000,
                                              progress=False)
    assert nbr_ids.shape == (len(ids), 12) and nbr_scores.shape == (len(ids), 12)
    assert not (nbr_ids == ids[:, None]).any()  # no self matches
    assert all(len(set(row)) == 12 for row in nbr_ids.tolist())  # no repeated neighbours
    assert ids[1] not in nbr_ids[0] and ids[0] not in nbr_ids[1]
    assert ids[8] not in nbr_ids[7] and ids[7] not in nbr_ids[8]
    assert (nbr_scores < 1 - 1e-5).all() and (np.diff(nbr_scores, axis=1) <= 1e-6).all()
    # A bare faiss index works too (exact Flat scores).
    flat, _ = build_index(vectors, ids, "Flat", progress=False)
    flat_ids, _ = training_neighbours(flat, vectors[:50], ids[:50], 5, progress=False)
    assert not (flat_ids == ids[:50, None]).any() and ids[1] not in flat_ids[0]
