"""Inference-time retrieval: kNN from a part of the full index, chosen without rebuilding anything.

The paper's index-size ablation (Sec. 6.5) keeps one trained model and varies the images it may
retrieve from: one faiss id selector over the full index, the nested ``index_fraction`` subset of
:mod:`.subsets`, optionally intersected with a global score-quantile range (quantiles of the whole
index's score column, so a filter means the same images at every fraction and for every query).
The paper's score-quantile experiment (Sec. 4.2, Fig. 7-8) is per query instead: each query's
k * Q neighbours are split by score into Q groups and one group conditions the model. Training
neighbours never use any of this.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from knn_diffusion.encoders.store import EmbeddingStore
from knn_diffusion.retrieval.config import RetrievalConfig
from knn_diffusion.retrieval.index import read_sidecar
from knn_diffusion.retrieval.scores import filter_active, per_query_quantile, quantile_ids, score_lookup
from knn_diffusion.retrieval.search import Searcher, vectors_by_id
from knn_diffusion.retrieval.subsets import subset_mask

log = logging.getLogger(__name__)
SCORES_FILE = "scores.npz"  # the index stage writes it beside index.faiss: ids, scores, scorer

# queries (N, d) float32, k -> ids (N, k), scores (N, k), neighbour embeddings (N, k, d)
NeighbourSearch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class Neighbours:
    """An opened index, as every retrieval backend returns it (``retrieval/backends.py``)."""

    knn: NeighbourSearch                                   # queries (N, d), k -> content ids, similarities, embeddings
    sidecar: dict[str, Any]                                # the index's facts plus the retrieval settings
    images: Callable[[np.ndarray], np.ndarray]             # content ids (M,) -> uint8 (M, H, W, 3)
    scores: Callable[[np.ndarray], np.ndarray] | None      # content ids -> their score-column values, if any


def index_ids(index: faiss.Index) -> np.ndarray:
    """(ntotal,) int64: every id stored in an index from ``build_index`` (IDMap or inverted file)."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise ValueError(f"{type(index).__name__}: cannot list its ids (expected an IDMap or IVF index)")
    lists = ivf.invlists
    return np.concatenate([faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                           for i in range(lists.nlist)] or [np.empty(0, np.int64)]).astype(np.int64)


def allowed_ids(ids: np.ndarray, *, index_fraction: float = 1.0, subset_seed: int = 0,
                score_column: tuple[np.ndarray, np.ndarray] | None = None, score_low: float = 0.0,
                score_high: float = 1.0) -> np.ndarray:
    """The ids of ``ids`` that retrieval may return: the ``index_fraction`` subset (nested in larger
    fractions of the same seed) whose score quantile lies in [score_low, score_high).

    ``score_column``: (score ids, scores) of the whole index, needed only when the filter is active.
    """
    ids = np.asarray(ids, dtype=np.int64)
    keep = ids[subset_mask(ids, index_fraction, subset_seed)]
    if filter_active(score_low, score_high):
        if score_column is None:
            raise ValueError("retrieval.global_score_filter is set but the index has no score column "
                             f"({SCORES_FILE}); rebuild it with the index stage")
        keep = np.intersect1d(keep, quantile_ids(score_column[1], score_column[0], score_low, score_high))
    return np.sort(keep)


def read_score_column(index_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, scores) of the score column the index stage wrote beside the index, or None."""
    path = Path(index_dir) / SCORES_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        return data["ids"], data["scores"]


def embeddings_facts(store: EmbeddingStore) -> dict[str, str]:
    """What an index records of the embedding store it was built from: its ids and image content."""
    return {key: store.meta.get(key, "") for key in ("ids_sha256", "content_sha256")}


def check_same_embeddings(sidecar: dict[str, Any], store: EmbeddingStore, index_dir: Path) -> None:
    """Refuse to pair an index with another embedding store than its own (another clone's ingest or an older
    embed run): its ids would fetch the wrong vectors. Indexes that record nothing are not checked."""
    recorded = sidecar.get("embeddings")
    if recorded and recorded != embeddings_facts(store):
        raise ValueError(f"{index_dir}: built from embeddings {recorded}, but {store.root} holds "
                         f"{embeddings_facts(store)} (another ingest or embed run); rebuild the index")


def open_neighbour_search(index_dir: str | os.PathLike, embeddings_dir: str | os.PathLike, fingerprint: str,
                          dim: int, retrieval: RetrievalConfig | None = None) -> tuple[NeighbourSearch, dict[str, Any]]:
    """A ``knn(queries, k)`` over the index at ``index_dir`` restricted to the part of it that
    ``retrieval`` selects (subset and global score filter), and with its per-query score quantile.

    Neighbour embeddings are read from the embedding store at ``embeddings_dir`` (the one the index
    was built from). Every query gets exactly k results from the allowed ids, or a ValueError says
    how many are allowed. The returned sidecar is the index's, plus the retrieval settings and the
    number of retrievable images.
    """
    retrieval = retrieval or RetrievalConfig()
    fraction, seed = retrieval.index_fraction, retrieval.subset_seed
    low, high = retrieval.global_score_filter.low, retrieval.global_score_filter.high
    quantile, quantiles = retrieval.score_quantile, retrieval.score_quantiles
    if quantile > quantiles:
        raise ValueError(f"retrieval.score_quantile={quantile}: expected 0 (off) or 1..score_quantiles={quantiles}")
    index_dir = Path(index_dir)
    store = EmbeddingStore.open(embeddings_dir)
    searcher = Searcher.open(index_dir, fingerprint, dim, get_vectors=vectors_by_id(store.ids, store.get))
    sidecar = read_sidecar(index_dir)
    check_same_embeddings(sidecar, store, index_dir)
    filtering = filter_active(low, high)
    column = read_score_column(index_dir) if filtering or quantile else None
    if quantile and column is None:
        raise ValueError(f"retrieval.score_quantile={quantile} needs the index's score column "
                         f"({index_dir / SCORES_FILE}); rebuild it with the index stage")
    selector, allowed = None, searcher.index.ntotal
    if fraction < 1 or filtering:
        keep = allowed_ids(index_ids(searcher.index), index_fraction=fraction, subset_seed=seed,
                           score_column=column, score_low=low, score_high=high)
        if len(keep) == 0:
            raise ValueError(f"{index_dir}: no image passes index_fraction={fraction} and global score filter "
                             f"[{low}, {high})")
        selector, allowed = faiss.IDSelectorBatch(keep), len(keep)
        log.info("retrieval from %d of %d images of %s (index_fraction=%s, global score quantiles [%s, %s))",
                 allowed, searcher.index.ntotal, index_dir, fraction, low, high)
    score_of = score_lookup(*column) if quantile else None

    def knn(queries: np.ndarray, k: int):
        wanted = k * quantiles if quantile else k
        if wanted > allowed:
            raise ValueError(f"k={k} neighbours asked{f' x {quantiles} score quantiles' if quantile else ''}, but only "
                             f"{allowed} images of {index_dir} are retrievable (index_fraction={fraction}, "
                             f"global score filter [{low}, {high}))")
        found = searcher.search(queries, wanted, selector=selector, return_vectors=not quantile)
        if not quantile:
            return found.ids, found.scores, found.vectors
        ids, similarities = per_query_quantile(found.ids, found.scores, score_of(found.ids), k, quantile, quantiles)
        return ids, similarities, searcher.get_vectors(ids.ravel()).reshape(*ids.shape, -1)

    return knn, {**sidecar, "index_fraction": fraction, "subset_seed": seed, "global_score_filter": [low, high],
                 "score_quantile": [quantile, quantiles], "retrievable": allowed}
