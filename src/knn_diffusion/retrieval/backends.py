"""Retrieval backends: where inference-time neighbours come from, chosen by ``retrieval.backend``.

``sample``, ``generate`` and ``evaluate`` open one backend per run with :func:`open_backend` and ask it
for an index by name; they never look for directories themselves. A backend returns
:class:`Neighbours`: the ``knn(queries, k)`` search (content ids - the image ids the index was built
with, never a server's row positions -, similarities, neighbour embeddings), the index's sidecar with
the retrieval settings, the images of content ids (the retrieval baseline reads them here), and the
per-image score lookup. Every backend refuses an index built with another encoder (fingerprint)
before it searches.

* ``local``: the index stage's FAISS indexes, searched in this process (:class:`LocalFaiss`).
* ``served``: indexes exported with ``knn-diffusion serve-export`` and answered by LAION's kNN service,
  ``clip-retrieval back``, at ``retrieval.served_url`` (:class:`~knn_diffusion.retrieval.served.ServedIndex`).

A new backend is one class with ``has`` and ``open`` and one entry in :data:`BACKENDS`. A backend that
cannot answer mid-run raises :class:`ServiceUnavailable`, which the stages report as one ``error:`` line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from knn_diffusion.data.store import ImageStore
from knn_diffusion.retrieval.config import RetrievalConfig
from knn_diffusion.retrieval.index import read_sidecar
from knn_diffusion.retrieval.inference import Neighbours, open_neighbour_search, read_score_column
from knn_diffusion.retrieval.scores import score_lookup
from knn_diffusion.retrieval.served import ServedIndex, ServiceUnavailable


@dataclass(frozen=True)
class LocalRoots:
    """Where the local pipeline keeps indexes, embeddings and ingested images (``stages.paths``)."""

    index: Path
    embed: Path
    ingest: Path


class Backend(Protocol):
    def has(self, index: str) -> bool: ...

    def open(self, index: str, retrieval: RetrievalConfig | None = None) -> Neighbours: ...


class LocalFaiss:
    """Indexes the ``index`` stage wrote (or any index directory), searched in this process."""

    def __init__(self, retrieval: RetrievalConfig, roots: LocalRoots, fingerprint: str, dim: int):
        self.retrieval, self.roots, self.fingerprint, self.dim = retrieval, roots, fingerprint, dim

    def index_dir(self, index: str | os.PathLike) -> Path:
        return Path(index) if Path(index).is_dir() else self.roots.index / str(index)

    def has(self, index: str) -> bool:
        return self.index_dir(index).is_dir()

    def open(self, index: str, retrieval: RetrievalConfig | None = None) -> Neighbours:
        """The index named ``index`` (a dataset with an index under the index root, or a directory);
        its neighbours' embeddings and images are those of the dataset it was built on."""
        index_dir = self.index_dir(index)
        if not index_dir.is_dir():
            raise FileNotFoundError(f"index '{index}': neither a directory nor a dataset with an index under "
                                    f"{self.roots.index}")
        dataset = read_sidecar(index_dir).get("dataset", index_dir.name)
        knn, sidecar = open_neighbour_search(index_dir, self.roots.embed / dataset, self.fingerprint, self.dim,
                                             retrieval or self.retrieval)
        def read_images(ids: np.ndarray) -> np.ndarray:  # opened only when asked (sample never reads images)
            if not (self.roots.ingest / dataset).is_dir():
                raise FileNotFoundError(f"index '{index}': no ingested images of dataset '{dataset}' under "
                                        f"{self.roots.ingest}")
            return ImageStore.open(self.roots.ingest / dataset)[np.asarray(ids, np.int64)]

        column = read_score_column(index_dir)
        return Neighbours(knn, sidecar, read_images, score_lookup(*column) if column is not None else None)


BACKENDS: dict[str, Callable[..., Backend]] = {"local": LocalFaiss, "served": ServedIndex}
__all__ = ["BACKENDS", "LocalFaiss", "LocalRoots", "Neighbours", "ServedIndex", "ServiceUnavailable", "open_backend"]


def open_backend(retrieval: RetrievalConfig, roots: LocalRoots, fingerprint: str, dim: int) -> Backend:
    """The backend ``retrieval.backend`` names, for queries from the encoder with ``fingerprint``."""
    if retrieval.backend not in BACKENDS:
        raise ValueError(f"retrieval.backend={retrieval.backend!r}: expected one of {sorted(BACKENDS)}")
    return BACKENDS[retrieval.backend](retrieval, roots, fingerprint, dim)
