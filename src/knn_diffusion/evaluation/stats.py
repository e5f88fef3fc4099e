"""Confidence intervals for evaluation metrics, and verdicts computed from them.

Every metric of one evaluation is a statistic of per-prompt values (CLIP score, R-precision hits) or
of a set of images (FID, KID). Its uncertainty comes from which prompts were drawn, so the bootstrap
resamples *prompts* (scipy's ``stats.bootstrap``, percentile intervals); with several seeds per prompt,
the seeds of a prompt move together (a cluster bootstrap). FID resamples the generated images.

A difference between two systems measured on the same prompts and seeds is paired: each resample
draws one set of prompts for both, so the shared prompt difficulty cancels. A claim's verdict is read
off the interval of its difference, never typed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import numpy as np
from scipy import stats

DEFAULT_RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its (two-sided) confidence interval."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self, prefix: str) -> dict[str, float]:
        """Flat metric names: ``<prefix>``, ``<prefix>_ci_low``, ``<prefix>_ci_high``."""
        return {prefix: self.estimate, f"{prefix}_ci_low": self.low, f"{prefix}_ci_high": self.high}

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def per_prompt(values: np.ndarray) -> np.ndarray:
    """(prompts,) or (prompts, seeds) -> (prompts,): a prompt's seeds averaged, so they resample together."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (1, 2) or len(values) < 2:
        raise ValueError(f"expected per-prompt values of shape (prompts,) or (prompts, seeds) with at least "
                         f"2 prompts, got shape {values.shape}")
    return values if values.ndim == 1 else values.mean(axis=1)


def resampled_interval(n: int, statistic: Callable[[np.ndarray], float], *, resamples: int = DEFAULT_RESAMPLES,
                       level: float = LEVEL, seed: int = 0) -> Interval:
    """Bootstrap CI of any ``statistic(indices)`` over ``n`` units resampled with replacement.

    The general form: FID over resampled images, a paired difference over resampled prompts. The
    percentile interval is shifted by the bootstrap's bias (estimate - mean of the resampled values):
    zero for a mean, but a resampled image set holds duplicates, which raises FID by more than its
    spread, and the unshifted interval would then lie wholly above the full set's FID.
    """
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 units, got {n}")
    units = np.arange(n)
    result = stats.bootstrap((units,), lambda idx: statistic(idx.astype(np.int64)), vectorized=False,
                             n_resamples=resamples, confidence_level=level, method="percentile",
                             random_state=np.random.default_rng(seed))
    estimate = float(statistic(units))
    shift = estimate - float(np.mean(result.bootstrap_distribution))
    low, high = result.confidence_interval
    return Interval(estimate, float(low) + shift, float(high) + shift, level)


def mean_interval(values: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, level: float = LEVEL,
                  seed: int = 0) -> Interval:
    """The mean of per-prompt values (optionally x seeds) with a bootstrap CI over prompts."""
    prompt_means = per_prompt(values)
    return resampled_interval(len(prompt_means), lambda idx: float(prompt_means[idx].mean()),
                              resamples=resamples, level=level, seed=seed)


def paired_difference_interval(a: np.ndarray, b: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES,
                               level: float = LEVEL, seed: int = 0) -> Interval:
    """mean(a) - mean(b) for two systems scored on the same prompts (and seeds), paired by prompt."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must share prompts and seeds: shapes {a.shape} and {b.shape}")
    return mean_interval(a - b, resamples=resamples, level=level, seed=seed)


class Verdict(str, Enum):
    reproduced = "reproduced"
    contradicted = "contradicted"
    inconclusive = "inconclusive"


def verdict(difference: Interval, expected_sign: int) -> Verdict:
    """A claim "the difference is positive" (``expected_sign=+1``) or negative (-1), judged by its CI.

    Reproduced when the whole interval lies on the claimed side of 0, contradicted when it lies wholly
    on the other side, inconclusive when it contains 0.
    """
    if expected_sign not in (1, -1):
        raise ValueError(f"expected_sign must be +1 or -1, got {expected_sign}")
    low, high = expected_sign * difference.low, expected_sign * difference.high
    if min(low, high) > 0:
        return Verdict.reproduced
    if max(low, high) < 0:
        return Verdict.contradicted
    return Verdict.inconclusive
