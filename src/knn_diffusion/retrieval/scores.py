"""Per-image scores and the quantile-range filter (the paper's aesthetic-quantile experiment).

Scorers:

* ``colourfulness`` - Hasler & Suesstrunk (2003), "Measuring colourfulness in natural images":
  with rg = R - G and yb = (R + G) / 2 - B over an image's pixels (0-255),
  M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2). Grey images score 0;
  the authors' "extremely colourful" starts near 109. Needs no weights, so it is the default.
* ``laion_aesthetic`` - a linear head (weight (1, d), bias (1,)) on L2-normalised CLIP image
  embeddings, the form of LAION's aesthetic predictor v1; used when its weights file is supplied.

Retrieval is restricted with a faiss id selector, so searches still return k results from the
allowed images (``Searcher`` widens the search when a filtered query comes back short). Selectors
work with the index types ``choose_factory`` produces (Flat via IndexIDMap, IVF with flat or HNSW
coarse quantizer, fast-scan PQ) and with OPQ pre-transforms and plain HNSW (tests cover Flat,
IVF, and OPQ + IVF with an HNSW quantizer); faiss GPU indexes do not support them, but saved
indexes are always CPU indexes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import faiss
import numpy as np

from knn_diffusion.retrieval.config import Scorer


def colourfulness(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3|4) uint8 RGB(A) -> (N,) float32 Hasler-Suesstrunk colourfulness."""
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"colourfulness: expected (N, H, W, 3) images, got shape {images.shape}")
    rgb = images[..., :3].astype(np.float32).reshape(len(images), -1, 3)  # (N, H*W, 3)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    spread = np.sqrt(rg.std(axis=1) ** 2 + yb.std(axis=1) ** 2)
    mean = np.sqrt(rg.mean(axis=1) ** 2 + yb.mean(axis=1) ** 2)
    return (spread + 0.3 * mean).astype(np.float32)


WEIGHT_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt")


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    """Arrays from .safetensors / .npz / .pth|.pt without unpickling arbitrary objects."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(str(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value.float().numpy() for key, value in state.items()}


class LinearAestheticHead:
    """score = normalise(embedding) @ weight.T + bias."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        self.weight = np.asarray(weight, np.float32).reshape(-1)  # (d,)
        self.bias = float(np.asarray(bias, np.float32).reshape(-1)[0])

    @classmethod
    def load(cls, path: str | os.PathLike, expected_dim: int | None = None) -> "LinearAestheticHead":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: aesthetic head weights not found")
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ValueError(f"{path}: unknown weights format {path.suffix!r}; expected one of "
                             f"{WEIGHT_SUFFIXES}")
        try:
            tensors = _load_tensors(path)
        except Exception as err:  # unreadable, or not the format its suffix says
            raise ValueError(f"{path}: cannot read weights ({str(err).splitlines()[0]})") from None
        weights = [k for k in tensors if k.endswith("weight")]
        biases = [k for k in tensors if k.endswith("bias")]
        if len(weights) != 1 or len(biases) != 1:
            raise ValueError(f"{path}: expected one 'weight' (1, d) and one 'bias' (1,) tensor, "
                             f"found keys {sorted(tensors)}")
        weight, bias = tensors[weights[0]], tensors[biases[0]]
        if weight.ndim != 2 or weight.shape[0] != 1 or bias.size != 1:
            raise ValueError(f"{path}: weight has shape {weight.shape} and bias {bias.shape}; a linear "
                             "head needs (1, d) and (1,)")
        if expected_dim is not None and weight.shape[1] != expected_dim:
            raise ValueError(f"{path}: head takes {weight.shape[1]}-d embeddings, the encoder gives "
                             f"{expected_dim}-d")
        return cls(weight, bias)

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        embeddings = np.asarray(embeddings, np.float32)
        unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        return (unit @ self.weight + self.bias).astype(np.float32)


def resolve_scorer(scorer: Scorer | str, weights: str = "") -> Scorer:
    """``auto`` means the aesthetic head when its weights are given, else colourfulness."""
    scorer = Scorer(scorer)
    if scorer is Scorer.auto:
        return Scorer.laion_aesthetic if weights else Scorer.colourfulness
    if scorer is Scorer.laion_aesthetic and not weights:
        raise ValueError("index.scorer='laion_aesthetic' needs index.scorer_weights (a .pth, "
                         ".npz or .safetensors file with the linear head)")
    return scorer


def filter_active(low: float, high: float) -> bool:
    return low > 0 or high < 1


def image_scores(scorer: Scorer | str, weights: str = "", *, embeddings: np.ndarray | None = None,
                 image_batches: Iterable[np.ndarray] | None = None) -> np.ndarray:
    """(N,) float32 score column for the images, by the configured scorer.

    ``embeddings`` (N, d) feed the aesthetic head; ``image_batches`` (uint8 (n, H, W, 3) batches, in
    the same image order) feed colourfulness. Pass what the resolved scorer needs.
    """
    scorer = resolve_scorer(scorer, weights)
    if scorer is Scorer.laion_aesthetic:
        if embeddings is None:
            raise ValueError("the laion_aesthetic scorer needs the images' CLIP embeddings")
        return LinearAestheticHead.load(weights, expected_dim=embeddings.shape[1])(embeddings)
    if image_batches is None:
        raise ValueError("the colourfulness scorer needs the images (uint8 batches)")
    return np.concatenate([colourfulness(batch) for batch in image_batches])


def quantile_ids(scores: np.ndarray, ids: np.ndarray, low_q: float, high_q: float) -> np.ndarray:
    """Ids whose score lies in [quantile(low_q), quantile(high_q)); high_q = 1 includes the top."""
    if not 0 <= low_q < high_q <= 1:
        raise ValueError(f"score quantile range [{low_q}, {high_q}): expected 0 <= low < high <= 1")
    scores, ids = np.asarray(scores), np.asarray(ids, dtype=np.int64)
    if scores.shape != ids.shape:
        raise ValueError(f"{scores.shape} scores for {ids.shape} ids")
    low, high = np.quantile(scores, [low_q, high_q])
    inside = (scores >= low) & ((scores < high) if high_q < 1 else (scores <= high))
    if not inside.any():
        raise ValueError(f"no image scores in the quantile range [{low_q}, {high_q}) = [{low}, {high})")
    return ids[inside]


def quantile_selector(scores: np.ndarray, ids: np.ndarray, low_q: float, high_q: float) -> faiss.IDSelector:
    """A faiss selector accepting only images whose score is in the quantile range [low_q, high_q)."""
    allowed = quantile_ids(scores, ids, low_q, high_q)
    selector = faiss.IDSelectorBatch(allowed)
    selector.allowed_count = len(allowed)
    return selector


def score_lookup(score_ids: np.ndarray, scores: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """ids (any shape) -> their scores from the column (``score_ids`` (N,), ``scores`` (N,)); a KeyError
    names ids the column lacks."""
    score_ids, scores = np.asarray(score_ids, np.int64), np.asarray(scores, np.float32)
    order = np.argsort(score_ids, kind="stable")
    sorted_ids, sorted_scores = score_ids[order], scores[order]

    def lookup(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        slots = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
        missing = sorted_ids[slots] != ids if len(sorted_ids) else np.ones(ids.shape, bool)
        if missing.any():
            raise KeyError(f"ids without a score in the score column: {ids[missing][:5].tolist()}")
        return sorted_scores[slots]

    return lookup


def per_query_quantile(ids: np.ndarray, similarities: np.ndarray, neighbour_scores: np.ndarray, k: int,
                       quantile: int, quantiles: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's per-query score quantiles (Sec. 4.2, Fig. 8): of each query's k * ``quantiles``
    neighbours (ids, similarities, and ``neighbour_scores``, all (N, k * quantiles), best match first),
    the k in score quantile ``quantile`` (1 = lowest scores .. ``quantiles`` = highest), kept in
    their similarity order. Returns (ids (N, k), similarities (N, k)).
    """
    if not 1 <= quantile <= quantiles:
        raise ValueError(f"score quantile {quantile}: expected 1..{quantiles}")
    if ids.shape != (len(ids), k * quantiles) or similarities.shape != ids.shape or neighbour_scores.shape != ids.shape:
        raise ValueError(f"per_query_quantile: expected (N, {k * quantiles}) ids, similarities and scores, got "
                         f"{ids.shape}, {similarities.shape}, {neighbour_scores.shape}")
    by_score = np.argsort(neighbour_scores, axis=1, kind="stable")  # ascending score
    chosen = np.sort(by_score[:, (quantile - 1) * k:quantile * k], axis=1)  # back to similarity order
    return np.take_along_axis(ids, chosen, 1), np.take_along_axis(similarities, chosen, 1)
