"""Bootstrap 95% CIs of every metric of an evaluated grid point, and paired CIs of the difference of two points.

A point is generated for P prompts x S seeds (image ``s * P + p`` is prompt p's seed s), so what a
metric is computed from is kept per image: the judge's cosine with its prompt (CLIP score), whether its
prompt ranked first (R-precision) and its FID/KID features. :class:`PointScores` holds them; it is
saved beside the point's images and logged with its MLflow run, so the report can pair two points of
different runs (a kNN and a no-kNN model) on the same prompts and seeds later.

Resampling is over prompts, a prompt's seeds moving together (:mod:`knn_diffusion.evaluation.stats`).
CLIP score and R-precision are means of per-prompt values. FID and KID are statistics of the image set:
each resample refits them on the images of the drawn prompts; their reference set (the test split's
images) stays fixed, its statistics computed once. KID's resamples use the unbiased MMD^2 over the whole
resampled set (the estimand of torchmetrics' subset average), from kernel matrices computed once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knn_diffusion.evaluation.stats import Interval, mean_interval, paired_difference_interval, resampled_interval
from knn_diffusion.io import save_npy

PARTS = ("clip", "hits", "features")  # the files of a saved PointScores: <part>.npy
CI_METRICS = ("fid", "kid_mean", "clip_score", "r_precision")  # each gets a CI (kid_std is a spread, not an estimate)
PAIRED_METRICS = ("clip_score", "r_precision", "fid")  # differences between two points get paired CIs


def interval_columns() -> list[str]:
    """The CI bounds every point carries beside its metrics."""
    return [f"{m}_ci_{side}" for m in CI_METRICS for side in ("low", "high")]


@dataclass
class PointScores:
    """Per-image values of one point: ``clip`` and ``hits`` (P, S); ``features`` (S * P, f), seed-major."""

    clip: np.ndarray
    hits: np.ndarray
    features: np.ndarray

    @classmethod
    def from_rows(cls, clip: np.ndarray, hits: np.ndarray, features: np.ndarray, seeds: int) -> "PointScores":
        """Per-row values of S * P images (seed-major) -> per (prompt, seed)."""
        def by_prompt(values):
            return np.asarray(values, np.float64).reshape(seeds, -1).T  # (P, S)
        return cls(by_prompt(clip), by_prompt(hits), np.asarray(features, np.float32))

    @property
    def prompts(self) -> int:
        return self.clip.shape[0]

    def rows(self, prompts: np.ndarray) -> np.ndarray:
        """The feature rows of every seed of the given prompts (a resample's images)."""
        seeds = self.clip.shape[1]
        return (np.arange(seeds)[:, None] * self.prompts + np.asarray(prompts)[None, :]).reshape(-1)

    def save(self, folder: str | Path) -> None:
        for part in PARTS:
            save_npy(Path(folder) / f"{part}.npy", getattr(self, part))

    @classmethod
    def load(cls, folder: str | Path) -> "PointScores":
        return cls(*(np.load(Path(folder) / f"{part}.npy") for part in PARTS))


class Reference:
    """The FID/KID reference features (M, f) and what every resample reuses: their mean, the square root
    of their covariance, and their kernel's mean over distinct pairs (KID's polynomial kernel)."""

    def __init__(self, features: np.ndarray):
        self.features = np.asarray(features, np.float64)
        self.mean = self.features.mean(axis=0)
        cov = np.cov(self.features, rowvar=False)
        eigenvalues, vectors = np.linalg.eigh(cov)  # symmetric PSD (singular when M < f): its root from eigh
        self.sqrt_cov = (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T
        self.trace_cov = float(np.trace(cov))
        kernel = self.kernel(self.features, self.features)
        m = len(self.features)
        self.self_term = float((kernel.sum() - np.trace(kernel)) / (m * (m - 1)))

    def kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """torchmetrics' KID kernel: (a . b / d + 1) ** 3."""
        return (a @ b.T / self.features.shape[1] + 1.0) ** 3

    def fid(self, generated: np.ndarray) -> float:
        """Frechet distance to the reference; Tr sqrt(C_r C_g) = Tr sqrt(C_r^1/2 C_g C_r^1/2), a symmetric matrix."""
        generated = np.asarray(generated, np.float64)
        cov = np.cov(generated, rowvar=False)
        eigenvalues = np.linalg.eigvalsh(self.sqrt_cov @ cov @ self.sqrt_cov)
        return float(np.sum((self.mean - generated.mean(axis=0)) ** 2) + self.trace_cov + np.trace(cov)
                     - 2 * np.sqrt(np.clip(eigenvalues, 0, None)).sum())


class SetStatistics:
    """FID and unbiased MMD^2 of any subset of one point's images, from matrices computed once."""

    def __init__(self, reference: Reference, scores: PointScores):
        self.reference, self.scores = reference, scores
        features = np.asarray(scores.features, np.float64)
        self.features = features

    @functools.cached_property
    def cross(self) -> np.ndarray:
        """(N,) each image's mean kernel value with the reference images."""
        return self.reference.kernel(self.reference.features, self.features).mean(axis=0)

    @functools.cached_property
    def gram(self) -> np.ndarray:
        """(N, N) the kernel between the point's images."""
        return self.reference.kernel(self.features, self.features)

    def fid(self, prompts: np.ndarray) -> float:
        return self.reference.fid(self.features[self.scores.rows(prompts)])

    def mmd2(self, prompts: np.ndarray) -> float:
        rows = self.scores.rows(prompts)
        n = len(rows)
        gram = self.gram[np.ix_(rows, rows)]
        within = (gram.sum() - np.trace(gram)) / (n * (n - 1))
        return float(self.reference.self_term + within - 2 * self.cross[rows].mean())


def point_intervals(scores: PointScores, reference: Reference, values: dict[str, float], *, resamples: int,
                    set_resamples: int, seed: int = 0) -> dict[str, float]:
    """``<metric>_ci_low`` / ``_ci_high`` for every metric of ``values`` the point's scores give.

    Each interval is placed around the logged value: FID's and KID's resampled statistic is refitted
    here, and its interval shifted by the difference between the logged value and this refit (zero for
    FID, the subset average vs the full-set estimate for KID).
    """
    sets = SetStatistics(reference, scores)
    all_prompts = np.arange(scores.prompts)
    intervals = {
        "clip_score": (mean_interval(scores.clip, resamples=resamples, seed=seed), None),
        "r_precision": (mean_interval(scores.hits, resamples=resamples, seed=seed), None),
        "fid": (resampled_interval(scores.prompts, sets.fid, resamples=set_resamples, seed=seed), sets.fid),
        "kid_mean": (resampled_interval(scores.prompts, sets.mmd2, resamples=set_resamples, seed=seed), sets.mmd2),
    }
    out = {}
    for metric, (interval, refit) in intervals.items():
        shift = values[metric] - refit(all_prompts) if refit is not None else 0.0
        out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = interval.low + shift, interval.high + shift
    return out


def paired_differences(a: PointScores, b: PointScores, reference: Reference, *, resamples: int, set_resamples: int,
                       seed: int = 0, metrics: tuple[str, ...] = PAIRED_METRICS) -> dict[str, Interval]:
    """a - b of ``metrics`` (CLIP score, R-precision, FID), paired on the same prompts and seeds (refused otherwise)."""
    if a.clip.shape != b.clip.shape:
        raise ValueError(f"paired points must share prompts and seeds: {a.clip.shape} vs {b.clip.shape} "
                         "(prompts, seeds)")
    out = {}
    for metric in metrics:
        if metric == "fid":
            set_a, set_b = SetStatistics(reference, a), SetStatistics(reference, b)
            out[metric] = resampled_interval(a.prompts, lambda idx: set_a.fid(idx) - set_b.fid(idx),
                                             resamples=set_resamples, seed=seed)
        else:
            part = {"clip_score": "clip", "r_precision": "hits"}[metric]
            out[metric] = paired_difference_interval(getattr(a, part), getattr(b, part), resamples=resamples, seed=seed)
    return out
