"""The statistics of a pairwise preference study: a binomial interval and inter-rater agreement."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion, as fractions in [0, 1] (NaNs for zero trials).

    Wilson rather than the normal approximation: it stays inside [0, 1] and keeps its coverage at the
    extremes (a unanimous 100% on a few dozen pairs), which is where small studies land.
    """
    if trials == 0:
        return float("nan"), float("nan")
    interval = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of a (subjects, categories) matrix of rating counts; NaN when it is undefined.

    Subjects may have different numbers of raters (each needs at least two): the per-subject agreement
    uses its own count, the chance agreement pools every rating. Undefined when all ratings fall in one
    category (chance agreement is then 1).
    """
    counts = np.asarray(counts, dtype=np.float64)  # (N, C)
    per_subject = counts.sum(axis=1)  # (N,)
    counts = counts[per_subject >= 2]
    per_subject = per_subject[per_subject >= 2]
    if len(counts) == 0:
        return float("nan")
    agreement = ((counts ** 2).sum(axis=1) - per_subject) / (per_subject * (per_subject - 1))  # (N,)
    shares = counts.sum(axis=0) / per_subject.sum()  # (C,)
    chance = float((shares ** 2).sum())
    if chance >= 1.0:
        return float("nan")
    return float((agreement.mean() - chance) / (1.0 - chance))
