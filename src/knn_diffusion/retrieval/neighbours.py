"""The ``knn`` stage's table: k_max neighbours of every training image, precomputed once.

A neighbour is dropped when it is the image itself, has the same content hash (the same picture
stored twice) or an identical embedding (cosine >= ``duplicate_cosine``); the search asks for more
than k_max and widens until every row keeps k_max, so the table is rectangular.
"""

from __future__ import annotations

import faiss
import numpy as np
from tqdm.auto import tqdm

from knn_diffusion.retrieval.search import Searcher

DUPLICATE_COSINE = 1 - 1e-5  # float16 stores round identical images to within ~1e-6


def _first_kept(values: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, best first
    return np.take_along_axis(values, order, 1)[:, :k]


def training_neighbours(searcher: Searcher | faiss.Index, vectors: np.ndarray, ids: np.ndarray,
                        k_max: int, content_hashes: np.ndarray | None = None, *,
                        batch_size: int = 1_024, duplicate_cosine: float = DUPLICATE_COSINE,
                        progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour ids (N, k_max) int64, scores (N, k_max) float32) for images ``ids`` (N,) with
    embeddings ``vectors`` (N, d), best first, without self or duplicates.

    ``content_hashes`` is indexed by image id (``content_hashes[i]`` is the hash of image i) and
    covers every id the index can return. Scores are exact cosines when the searcher re-ranks
    against the stored embeddings or the index is exact; otherwise (codes, or the float16 re-rank
    store) identical embeddings are found by fetching them with ``searcher.get_vectors`` when it has one.
    """
    searcher = searcher if isinstance(searcher, Searcher) else Searcher(searcher)
    ids = np.asarray(ids, dtype=np.int64)
    if len(vectors) != len(ids):
        raise ValueError(f"training_neighbours: {len(vectors)} vectors but {len(ids)} ids")
    if k_max >= searcher.index.ntotal:
        raise ValueError(f"k_max={k_max} needs an index of more than {k_max} images, it has "
                         f"{searcher.index.ntotal}")
    out_ids = np.empty((len(ids), k_max), np.int64)
    out_scores = np.empty((len(ids), k_max), np.float32)
    for lo in tqdm(range(0, len(ids), batch_size), desc="neighbours", unit="batch", disable=not progress):
        query_ids = ids[lo:lo + batch_size]
        queries = np.asarray(vectors[lo:lo + batch_size], dtype=np.float32)
        want = min(k_max + 1 + max(k_max // 4, 4), searcher.index.ntotal)
        while True:
            found = searcher.search(queries, want)
            scores = found.scores
            if not searcher.exact_scores and searcher.get_vectors is not None:
                scores = _exact_cosines(searcher, queries, found.ids)
            drop = (found.ids == query_ids[:, None]) | (scores >= duplicate_cosine)
            if content_hashes is not None:
                drop |= content_hashes[found.ids] == content_hashes[query_ids][:, None]
            if ((~drop).sum(axis=1) >= k_max).all():
                break
            if want == searcher.index.ntotal:
                raise ValueError(f"fewer than k_max={k_max} distinct neighbours exist for some images")
            want = min(2 * want, searcher.index.ntotal)
        out_ids[lo:lo + len(query_ids)] = _first_kept(found.ids, ~drop, k_max)
        out_scores[lo:lo + len(query_ids)] = _first_kept(found.scores, ~drop, k_max)
    return out_ids, out_scores


def _exact_cosines(searcher: Searcher, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    vectors = searcher.get_vectors(ids.ravel()).reshape(*ids.shape, -1)  # (N, k, d)
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.einsum("nkd,nd->nk", vectors, queries)
