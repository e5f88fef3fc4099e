"""Batched kNN search over a loaded index, with exact re-ranking and id filters.

A PQ code caps recall (about 0.5-0.8 10-recall@10 on clustered 512-d data) however many lists are
probed. ``Searcher`` lifts the cap by fetching ``k * rerank_factor`` candidates and re-scoring them
exactly. Indexes from ``choose_factory`` carry their re-rank store (``IndexRefine`` over a
memory-mapped float16 copy), so faiss re-scores in C++ and ``rerank_factor`` is its ``k_factor``;
for any other index ``get_vectors`` reads the full embeddings from the (memory-mapped) embedding
store. Either way RAM holds only the codes and ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import faiss
import numpy as np

from knn_diffusion.retrieval.index import load_index, normalised, refine_of

# ids (m,) int64 -> (m, d) float32 embeddings of those images
VectorGetter = Callable[[np.ndarray], np.ndarray]


def vectors_by_id(ids: np.ndarray, rows: np.ndarray | Callable[[np.ndarray], np.ndarray]) -> VectorGetter:
    """A ``get_vectors`` for ``ids`` (N,) aligned with ``rows``: an (N, d) array or memory map, or a
    callable mapping sorted positions to rows (e.g. ``EmbeddingStore.get``)."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    fetch = rows if callable(rows) else (lambda positions: rows[positions])

    def get_vectors(wanted: np.ndarray) -> np.ndarray:
        wanted = np.asarray(wanted, dtype=np.int64)
        slots = np.clip(np.searchsorted(sorted_ids, wanted), 0, len(ids) - 1)
        unknown = sorted_ids[slots] != wanted
        if unknown.any():
            raise KeyError(f"ids not in the embedding table: {wanted[unknown][:5].tolist()}")
        positions = order[slots]
        by_position = np.argsort(positions, kind="stable")  # read the store in file order
        out = np.empty((len(wanted), 0), np.float32)
        if len(wanted):
            fetched = np.asarray(fetch(positions[by_position]), dtype=np.float32)
            out = np.empty_like(fetched)
            out[by_position] = fetched
        return out

    return get_vectors


def is_exact(index: faiss.Index) -> bool:
    inner = index.index if isinstance(index, faiss.IndexIDMap) else index
    return isinstance(faiss.downcast_index(inner), faiss.IndexFlat)


def search_parameters(index: faiss.Index, params: dict[str, int],
                      selector: faiss.IDSelector | None = None, rerank_factor: int = 1) -> faiss.SearchParameters:
    """faiss ``SearchParameters`` carrying nprobe / efSearch, the re-rank factor and an optional id selector.

    Handles the wrappers the factory produces: ``IndexPreTransform`` (OPQ) and ``IndexIDMap`` pass
    parameters to the index inside; an ``IndexIDMap`` over an ``IndexRefine`` translates the selector
    to row positions itself (IndexRefine passes only its base's parameters on); IVF takes nprobe and,
    for an HNSW coarse quantizer, its efSearch.
    """
    index = faiss.downcast_index(index)
    refine = refine_of(index)
    if refine is not None:
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) and selector is not None:
            translated = faiss.IDSelectorTranslated(index.id_map, selector)
            translated.keep_alive = selector
            selector = translated
        base = search_parameters(refine.base_index, params, selector)
        out = faiss.IndexRefineSearchParameters(k_factor=float(rerank_factor), base_index_params=base)
        out.keep_alive = base  # SWIG holds a raw pointer
        return out
    if isinstance(index, faiss.IndexPreTransform):
        inner = search_parameters(index.index, params, selector)
        outer = faiss.SearchParametersPreTransform(index_params=inner)
        outer.keep_alive = inner  # SWIG holds a raw pointer
        return outer
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return search_parameters(index.index, params, selector)
    if isinstance(index, faiss.IndexIVF):
        out = faiss.SearchParametersIVF(sel=selector, nprobe=params.get("nprobe", index.nprobe))
        if "quantizer_efSearch" in params:
            out.quantizer_params = faiss.SearchParametersHNSW(efSearch=params["quantizer_efSearch"])
            out.keep_alive = out.quantizer_params
    elif isinstance(index, faiss.IndexHNSW):
        out = faiss.SearchParametersHNSW(sel=selector,
                                         efSearch=params.get("efSearch", index.hnsw.efSearch))
    else:
        out = faiss.SearchParameters(sel=selector)
    out.keep_selector = selector
    return out


def _widened(index: faiss.Index, params: dict[str, int]) -> dict[str, int] | None:
    """Params that search more of the index (for filtered queries short of k), or None at the limit."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        nprobe = params.get("nprobe", ivf.nprobe)
        if nprobe >= ivf.nlist:
            return None
        wider = {**params, "nprobe": min(2 * nprobe, ivf.nlist)}
        if "quantizer_efSearch" in params:
            wider["quantizer_efSearch"] = max(params["quantizer_efSearch"], wider["nprobe"])
        return wider
    hnsw = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
    if isinstance(hnsw, faiss.IndexHNSW):
        ef = params.get("efSearch", hnsw.hnsw.efSearch)
        return {**params, "efSearch": 2 * ef} if ef < index.ntotal else None
    return None


@dataclass
class SearchResult:
    ids: np.ndarray                 # (N, k) int64, best first
    scores: np.ndarray              # (N, k) float32 cosine similarity (exact when re-ranked)
    vectors: np.ndarray | None = None  # (N, k, d) float32 neighbour embeddings, when asked for


class Searcher:
    """kNN over a faiss index for image or text query embeddings (L2-normalised on the way in)."""

    def __init__(self, index: faiss.Index, search_params: dict[str, int] | None = None, *,
                 get_vectors: VectorGetter | None = None, rerank_factor: int = 1,
                 batch_size: int = 256):
        self.refines = refine_of(index) is not None  # faiss re-ranks against the index's own store
        if rerank_factor > 1 and get_vectors is None and not self.refines:
            raise ValueError("rerank_factor > 1 needs get_vectors to fetch the full embeddings")
        self.index = index
        self.search_params = dict(search_params or {})
        self.get_vectors = get_vectors
        self.rerank_factor = rerank_factor
        self.batch_size = batch_size

    @classmethod
    def open(cls, path: str | os.PathLike, expected_fingerprint: str | None = None,
             expected_dim: int | None = None, *, get_vectors: VectorGetter | None = None,
             rerank_factor: int | None = None, mmap: bool = True, batch_size: int = 256) -> "Searcher":
        """Any index directory written by ``save_index`` (index swap), with its tuned parameters.

        ``rerank_factor`` defaults to the one the index was tuned with when ``get_vectors`` is given.
        """
        index, meta = load_index(path, expected_fingerprint, expected_dim, mmap=mmap)
        if rerank_factor is None:
            tuned = meta.get("rerank_factor", 1)
            rerank_factor = tuned if get_vectors is not None or refine_of(index) is not None else 1
        return cls(index, meta.get("search_params", {}), get_vectors=get_vectors,
                   rerank_factor=rerank_factor, batch_size=batch_size)

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def exact_scores(self) -> bool:
        """Whether returned scores are float32 cosines (exact index or re-rank against the store)."""
        return is_exact(self.index) or (self.rerank_factor > 1 and not self.refines)

    def search(self, queries: np.ndarray, k: int, *, selector: faiss.IDSelector | None = None,
               return_vectors: bool = False) -> SearchResult:
        """Top-``k`` ids and scores per query (Q, d); always k per row or a ValueError.

        With a ``selector`` only ids it accepts are returned; rows that come back short are searched
        again over more of the index until they have k.
        """
        queries = np.atleast_2d(queries)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index holds {self.dim}-d")
        if k > self.index.ntotal:
            raise ValueError(f"asked for k={k} neighbours from an index of {self.index.ntotal}")
        if return_vectors and self.get_vectors is None:
            raise ValueError("return_vectors=True needs a Searcher with get_vectors")
        ids = np.empty((len(queries), k), np.int64)
        scores = np.empty((len(queries), k), np.float32)
        for lo in range(0, len(queries), self.batch_size):
            batch = normalised(queries[lo:lo + self.batch_size])
            ids[lo:lo + len(batch)], scores[lo:lo + len(batch)] = self._search_batch(batch, k, selector)
        vectors = None
        if return_vectors:
            vectors = self.get_vectors(ids.ravel()).reshape(*ids.shape, -1)  # (N, k, d)
        return SearchResult(ids, scores, vectors)

    def _search_batch(self, queries: np.ndarray, k: int, selector) -> tuple[np.ndarray, np.ndarray]:
        candidates = k if self.refines else min(k * self.rerank_factor, self.index.ntotal)
        scores, ids = self._candidates(queries, candidates, self.search_params, selector)
        short = (ids >= 0).sum(axis=1) < k
        params = self.search_params
        while short.any():
            params = _widened(self.index, params)
            if params is None:
                raise ValueError(f"only {(ids[short] >= 0).sum(axis=1).min()} ids pass the filter for "
                                 f"some queries, fewer than k={k}")
            scores[short], ids[short] = self._candidates(queries[short], candidates, params, selector)
            short = (ids >= 0).sum(axis=1) < k
        if self.rerank_factor > 1 and not self.refines:
            scores = self._exact_scores(queries, ids)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        return ids[:, :k], scores[:, :k]

    def _candidates(self, queries, k, params, selector):
        if not params and selector is None and not self.refines:
            return self.index.search(queries, k)
        return self.index.search(queries, k, params=search_parameters(self.index, params, selector,
                                                                      self.rerank_factor))

    def _exact_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Cosine of each query (Q, d) with its candidates' stored embeddings; -inf for missing ids."""
        valid = ids >= 0
        unique, inverse = np.unique(ids[valid], return_inverse=True)
        vectors = normalised(self.get_vectors(unique))  # (U, d)
        rows = np.nonzero(valid)[0]
        scores = np.full(ids.shape, -np.inf, np.float32)
        scores[valid] = np.einsum("nd,nd->n", vectors[inverse], queries[rows])
        return scores


# ----------------------------------------------------------------------------------------------
# Ground truth and tuning

PLATEAU = 0.002  # recall gained over two doublings of nprobe below which tuning stops


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """k-recall@k: mean fraction of the true k nearest ids found among the returned k."""
    hits = [len(np.intersect1d(f[:k], t[:k])) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k)


def exact_neighbours(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int,
                     batch: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force (scores (Q, k), ids (Q, k)) over ``vectors`` read ``batch`` rows at a time."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    blocks = (normalised(vectors[lo:lo + batch]) for lo in range(0, len(vectors), batch))
    scores, positions = knn_ground_truth(normalised(queries), blocks, k,
                                         metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
    return scores, np.asarray(ids, dtype=np.int64)[positions]


def search_parameter_grid(index: faiss.Index) -> dict[str, list[int]]:
    """The values faiss' ``ParameterSpace`` offers for this index (nprobe, quantizer_efSearch, ...)."""
    refine = refine_of(index)
    space = faiss.ParameterSpace()
    space.initialize(refine.base_index if refine is not None else index)
    ranges = (space.parameter_ranges.at(i) for i in range(space.parameter_ranges.size()))
    return {r.name: [int(v) for v in faiss.vector_to_array(r.values)] for r in ranges
            if r.name in ("nprobe", "quantizer_efSearch", "efSearch")}


def without_ids(ids: np.ndarray, drop: np.ndarray, k: int) -> np.ndarray:
    """The first k ids (N, k) of each row of ``ids`` (N, >k) once ``drop`` (N,) is removed from it."""
    keep = ids != np.asarray(drop)[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, in their order
    return np.take_along_axis(ids, order, 1)[:, :k]


def tune_search_params(searcher: Searcher, queries: np.ndarray, truth_ids: np.ndarray, k: int = 10,
                       target_recall: float = 0.95, query_ids: np.ndarray | None = None
                       ) -> tuple[dict[str, int], float]:
    """Smallest nprobe (then efSearch, then re-rank factor) at which ``searcher`` reaches
    ``target_recall`` k-recall@k against ``truth_ids`` (Q, >=k) from exact search.

    Sets the result on ``searcher`` (``search_params``, and ``rerank_factor`` lowered to the smallest
    that suffices) and returns (search params, measured recall). If nothing reaches the target, the
    widest setting tried is kept.

    ``query_ids``: the queries are indexed images; their own id is dropped from the results (the
    caller drops it from ``truth_ids`` too), so recall measures the neighbours the knn stage uses.
    """

    def measure(params: dict[str, int]) -> float:
        searcher.search_params = params
        if query_ids is None:
            return recall_at_k(searcher.search(queries, k).ids, truth_ids, k)
        return recall_at_k(without_ids(searcher.search(queries, k + 1).ids, query_ids, k), truth_ids, k)

    grid = search_parameter_grid(searcher.index)
    ef_name = next((name for name in ("quantizer_efSearch", "efSearch") if name in grid), None)
    ef_floor = 64

    def setting(nprobe: int | None) -> dict[str, int]:
        params = {} if nprobe is None else {"nprobe": nprobe}
        if ef_name:  # generous first; lowered once nprobe is fixed
            params[ef_name] = max(4 * (nprobe or 1), ef_floor) if nprobe else max(grid[ef_name])
        return params

    nprobes = grid.get("nprobe") or [None]
    miss, history = 0, []
    for nprobe in nprobes:
        params = setting(nprobe)
        recall = measure(params)
        history.append(recall)
        if recall >= target_recall:
            break
        if len(history) >= 3 and history[-1] - history[-3] < PLATEAU:
            break  # the codes, not the probes, cap recall: probing more only costs time
        miss = nprobe or 0
    if recall < target_recall:
        searcher.search_params = params
        return params, recall
    if nprobe is not None:  # bisect (miss, nprobe] for the smallest that still hits
        lo, hi = miss, nprobe
        while hi - lo > 1:
            mid = (lo + hi) // 2
            mid_recall = measure({**params, "nprobe": mid})
            lo, hi, recall = (lo, mid, mid_recall) if mid_recall >= target_recall else (mid, hi, recall)
        params = {**params, "nprobe": hi}
    if ef_name:
        for ef in sorted(v for v in grid[ef_name] if params.get("nprobe", 1) <= v < params[ef_name]):
            ef_recall = measure({**params, ef_name: ef})
            if ef_recall >= target_recall:
                params, recall = {**params, ef_name: ef}, ef_recall
                break
    if searcher.rerank_factor > 1:  # fewest re-ranked candidates that keep the target
        widest = searcher.rerank_factor
        for factor in range(1, widest):
            searcher.rerank_factor = factor
            factor_recall = measure(params)
            if factor_recall >= target_recall:
                recall = factor_recall
                break
        else:
            searcher.rerank_factor = widest
    searcher.search_params = params
    return params, recall
