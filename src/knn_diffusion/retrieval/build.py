"""One call for the ``index`` stage: build, tune against exact search, save."""

from __future__ import annotations

import os
from typing import Any

import faiss
import numpy as np

from knn_diffusion.retrieval.config import IndexConfig
from knn_diffusion.retrieval.index import BuildInfo, build_index, save_index, sidecar_from
from knn_diffusion.retrieval.search import (
    Searcher,
    VectorGetter,
    exact_neighbours,
    is_exact,
    tune_search_params,
    vectors_by_id,
    without_ids,
)


def build_tuned_index(vectors: np.ndarray, ids: np.ndarray, config: IndexConfig, fingerprint: str,
                      directory: str | os.PathLike, *, get_vectors: VectorGetter | None = None,
                      progress: bool = True, **sidecar_extra: Any) -> dict[str, Any]:
    """Build the index over all of (vectors (N, d), ids (N,)), tune nprobe /
    efSearch to ``config.target_recall`` (self-excluded ``tune_k``-recall on indexed images used as
    queries), save it to ``directory``; returns the sidecar.

    ``get_vectors`` fetches full embeddings by id for re-ranking; by default they are read from
    ``vectors`` (pass a memory map to keep them out of RAM).
    """
    ids = np.asarray(ids, dtype=np.int64)
    index, info = build_index(vectors, ids, config.factory, train_size=config.train_size,
                              seed=config.seed, batch=config.add_batch, use_gpu=config.use_gpu,
                              bytes_per_vector=config.bytes_per_vector, progress=progress)
    sidecar = tuned_sidecar(index, info, vectors, ids, config, fingerprint, get_vectors=get_vectors, **sidecar_extra)
    return save_index(index, directory, sidecar)


def tuned_sidecar(index: faiss.Index, info: BuildInfo, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig,
                  fingerprint: str, *, get_vectors: VectorGetter | None = None, **sidecar_extra: Any) -> dict[str, Any]:
    """Tune ``index`` (built over ``vectors`` with ``ids``) to ``config.target_recall`` and return its sidecar.

    ``vectors`` is read in slices (exact ground truth) and at the sampled query rows, so a row reader over
    a memory-mapped store serves as well as an array.
    """
    ids = np.asarray(ids, dtype=np.int64)
    rerank = 1 if is_exact(index) else config.rerank_factor
    searcher = Searcher(index, get_vectors=get_vectors or vectors_by_id(ids, vectors),
                        rerank_factor=rerank)
    k = min(config.tune_k, len(ids) - 1)
    rng = np.random.default_rng(config.seed + 1)
    query_rows = np.sort(rng.choice(len(ids), size=min(config.tune_queries, len(ids)), replace=False))
    queries, query_ids = np.asarray(vectors[query_rows], np.float32), ids[query_rows]
    _, truth = exact_neighbours(vectors, ids, queries, k + 1)
    truth = without_ids(truth, query_ids, k)
    params, recall = tune_search_params(searcher, queries, truth, k, config.target_recall, query_ids)
    return sidecar_from(info, fingerprint, params, recall, config.target_recall, k, searcher.rerank_factor,
                        seed=config.seed, **sidecar_extra)
