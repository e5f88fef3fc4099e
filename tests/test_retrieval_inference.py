"""Inference-time retrieval: index subsets and the score filter as id selectors over the full index."""

from __future__ import annotations

import numpy as np
import pytest

from knn_diffusion.encoders.store import begin_embedding, finish_embedding, emb_name, ids_name
from knn_diffusion.io import save_npy
from knn_diffusion.retrieval.build import build_tuned_index
from knn_diffusion.retrieval.config import IndexConfig
from knn_diffusion.retrieval.index import load_index
from knn_diffusion.retrieval.inference import SCORES_FILE, allowed_ids, index_ids, open_neighbour_search
from knn_diffusion.retrieval.subsets import subset_mask
from knn_diffusion.retrieval.synthetic import clustered_vectors

N, D, K = 2_000, 32, 5


@pytest.fixture(scope="module", params=["Flat", "IVF16,PQ16x4fs"])
def built(request, tmp_path_factory):
    """An embedding store of N vectors (ids not 0..N-1) and a full index over it with a score column."""
    root = tmp_path_factory.mktemp("inference")
    vectors = clustered_vectors(N, D, n_clusters=20, seed=3)
    ids = np.arange(N, dtype=np.int64) * 7 + 3
    store = root / "embed"
    for shard in begin_embedding(store, "enc", D, ids, 1_000, "float32"):
        save_npy(store / emb_name(shard), vectors[shard * 1_000:(shard + 1) * 1_000])
        save_npy(store / ids_name(shard), ids[shard * 1_000:(shard + 1) * 1_000])
    finish_embedding(store)
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
    knn, sidecar = open_neighbour_search(root / "index", root / "embed", "enc", D, index_fraction=0.3, subset_seed=0)
    found, scores, neighbours = knn(queries, K)
    subset = set(ids[subset_mask(ids, 0.3, 0)].tolist())
    assert found.shape == (len(queries), K) and neighbours.shape == (len(queries), K, D)
    assert set(found.ravel().tolist()) <= subset
    assert sidecar["index_fraction"] == 0.3 and sidecar["retrievable"] == len(subset)
    full, _ = open_neighbour_search(root / "index", root / "embed", "enc", D)
    assert not set(full(queries, K)[0].ravel().tolist()) <= subset  # the full index does retrieve outside it


def test_nested_subsets_and_score_filter_combine(built):
    root, vectors, ids, scores = built
    small = set(allowed_ids(ids, index_fraction=0.1).tolist())
    large = set(allowed_ids(ids, index_fraction=0.3).tolist())
    assert small < large and 0.05 < len(small) / N < 0.15  # the 10% subset lies inside the 30% one
    knn, sidecar = open_neighbour_search(root / "index", root / "embed", "enc", D, index_fraction=0.1,
                                         score_low=0.5)
    found = knn(vectors[:40], K)[0]
    top_half = set(ids[scores >= np.quantile(scores, 0.5)].tolist())
    assert set(found.ravel().tolist()) <= small & top_half
    assert sidecar["retrievable"] == len(small & top_half)
    with pytest.raises(ValueError, match=f"only {len(small & top_half)} images"):
        knn(vectors[:1], len(small & top_half) + 1)
