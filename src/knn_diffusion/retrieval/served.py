"""``retrieval.backend=served``: neighbours from LAION's kNN service (``clip-retrieval back``) over HTTP.

One service holds the indexes (exported with ``knn-diffusion serve-export``, see ``served_export.py``) for
every worker and notebook; they need no index, embedding or image files. Each query is one
``/knn-service`` request with ``embedding_input`` (our encoder's query vector: the service's own CLIP is
never used), answered with the content ids, similarities, embeddings, scores and images of the
neighbours. Every answer's encoder fingerprint is checked against ours before it is used.

The service searches its whole index: ``retrieval.index_fraction`` keeps the neighbours in the subset
(the same per-id hash as the local backend), asking for more until k pass; ``retrieval.score_quantile``
splits each query's k * Q neighbours as the local backend does. ``retrieval.global_score_filter`` needs
the whole score column before the search and is refused here.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import requests
from PIL import Image

from knn_diffusion.retrieval.config import RetrievalConfig
from knn_diffusion.retrieval.index import normalised
from knn_diffusion.retrieval.inference import Neighbours
from knn_diffusion.retrieval.scores import filter_active, per_query_quantile
from knn_diffusion.retrieval.subsets import subset_mask


# The wire format of the exported metadata (served_export.py writes it, the client reads it).
def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4").astype(np.float32)


def encode_png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


class ServiceUnavailable(ConnectionError):
    """The kNN service did not answer (down, unreachable, or an HTTP error): the run cannot go on."""


class ServedIndex:
    """Indexes a ``clip-retrieval back`` service at ``retrieval.served_url`` serves."""

    def __init__(self, retrieval: RetrievalConfig, roots: Any, fingerprint: str, dim: int):
        self.retrieval, self.fingerprint, self.dim = retrieval, fingerprint, dim
        self.url = retrieval.served_url.rstrip("/")
        self.session = requests.Session()

    def _call(self, path: str, payload: dict | None = None) -> Any:
        try:
            if payload is None:
                response = self.session.get(self.url + path, timeout=self.retrieval.served_timeout_s)
            else:
                response = self.session.post(self.url + path, json=payload, timeout=self.retrieval.served_timeout_s)
        except requests.RequestException as err:
            raise ServiceUnavailable(f"retrieval.served_url={self.url}: {path} got no answer ({type(err).__name__}); "
                                     "is `clip-retrieval back` running there?") from None
        if response.status_code != 200:
            raise ServiceUnavailable(f"retrieval.served_url={self.url}: {path} answered HTTP {response.status_code}")
        return response.json()

    def served(self) -> list[str]:
        return list(self._call("/indices-list"))

    def has(self, index: str) -> bool:
        return index in self.served()

    def open(self, index: str, retrieval: RetrievalConfig | None = None) -> Neighbours:
        """The served index ``index``, after checking that its vectors come from our encoder."""
        retrieval = retrieval or self.retrieval
        low, high = retrieval.global_score_filter.low, retrieval.global_score_filter.high
        if filter_active(low, high):
            raise ValueError(f"retrieval.global_score_filter=[{low}, {high}) needs the whole score column before the "
                             "search; retrieval.backend=served cannot filter the service's index (use "
                             "retrieval.score_quantile, or retrieval.backend=local)")
        quantile, quantiles = retrieval.score_quantile, retrieval.score_quantiles
        if quantile > quantiles:
            raise ValueError(f"retrieval.score_quantile={quantile}: expected 0 (off) or 1..score_quantiles={quantiles}")
        if index not in (names := self.served()):
            raise FileNotFoundError(f"index '{index}': not served by {self.url} (it serves {sorted(names)})")
        (first,) = self._call("/metadata", {"ids": [0], "indice_name": index})
        facts_text = first["metadata"]["facts"]
        facts = json.loads(facts_text)
        where = f"index '{index}' served by {self.url}"
        if facts["fingerprint"] != self.fingerprint:
            raise ValueError(f"{where}: built from encoder fingerprint {facts['fingerprint']!r}, but the embeddings "
                             f"in use have {self.fingerprint!r}; serve an index built with this encoder")
        if facts["d"] != self.dim:
            raise ValueError(f"{where}: holds {facts['d']}-d vectors, expected {self.dim}-d")
        if quantile and not facts["scores"]:
            raise ValueError(f"retrieval.score_quantile={quantile} needs a score column, and {where} has none; "
                             "export it again after the index stage wrote scores.npz")
        seen: dict[int, dict] = {}  # content id -> its metadata, from this index's answers

        def search(query: np.ndarray, count: int) -> list[dict]:
            """The ``count`` nearest of the index (fewer when it holds fewer), best first."""
            rows = self._call("/knn-service", {
                "embedding_input": query.tolist(), "modality": "image", "num_images": count,
                "num_result_ids": count, "indice_name": index, "deduplicate": False,
                "use_safety_model": False, "use_violence_detector": False})
            if any(row["facts"] != facts_text for row in rows):
                raise ValueError(f"{where}: an answer came from another index than the one opened (its facts "
                                 "changed); restart the run against one served index")
            return rows

        def nearest(query: np.ndarray, wanted: int) -> list[dict]:
            """The ``wanted`` nearest in the ``index_fraction`` subset, asking the service for more until they pass."""
            count = wanted
            while True:
                rows = search(query, count)
                ids = np.array([row["content_id"] for row in rows], np.int64)
                kept = [row for row, keep in zip(rows, subset_mask(ids, retrieval.index_fraction,
                                                                   retrieval.subset_seed)) if keep]
                if len(kept) >= wanted or count >= facts["ntotal"]:
                    break
                count = min(2 * count, facts["ntotal"])
            if len(kept) < wanted:
                raise ValueError(f"{wanted} neighbours asked, but only {len(kept)} images of {where} are retrievable "
                                 f"(index_fraction={retrieval.index_fraction})")
            for row in kept[:wanted]:
                seen[row["content_id"]] = row
            return kept[:wanted]

        def knn(queries: np.ndarray, k: int):
            wanted = k * quantiles if quantile else k
            rows = [nearest(query, wanted) for query in normalised(queries)]
            ids = np.array([[row["content_id"] for row in found] for found in rows], np.int64).reshape(-1, wanted)
            similarities = np.array([[row["similarity"] for row in found] for found in rows],
                                    np.float32).reshape(-1, wanted)
            if quantile:
                ids, similarities = per_query_quantile(ids, similarities, scores(ids), k, quantile, quantiles)
            return ids, similarities, vectors(ids)

        def column(ids: np.ndarray, name: str) -> list:
            unseen = [i for i in np.ravel(ids).tolist() if i not in seen]
            if unseen:
                raise KeyError(f"{where}: content ids {unseen[:5]} were not among its answers to this run")
            return [seen[i][name] for i in np.ravel(ids).tolist()]

        def vectors(ids: np.ndarray) -> np.ndarray:
            return np.stack([decode_vector(v) for v in column(ids, "embedding")]).reshape(*ids.shape, -1)

        def scores(ids: np.ndarray) -> np.ndarray:
            return np.asarray(column(ids, "score"), np.float32).reshape(np.shape(ids))

        def images(ids: np.ndarray) -> np.ndarray:
            if not facts["images"]:
                raise FileNotFoundError(f"{where}: exported without its images (no ingested dataset "
                                        f"'{facts['dataset']}' beside it)")
            return np.stack([decode_png(png) for png in column(ids, "png")])

        sidecar = {**{key: value for key, value in facts.items() if key not in ("scores", "images")},
                   "backend": "served", "served_url": self.url, "index_fraction": retrieval.index_fraction,
                   "subset_seed": retrieval.subset_seed, "global_score_filter": [low, high],
                   "score_quantile": [quantile, quantiles]}
        return Neighbours(knn, sidecar, images, scores if facts["scores"] else None)
