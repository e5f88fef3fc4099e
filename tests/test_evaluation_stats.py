"""Bootstrap intervals and verdicts (evaluation/stats.py), checked on simulations with a known truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knn_diffusion.evaluation.metrics import fid
from knn_diffusion.evaluation.stats import (
    Interval,
    Verdict,
    mean_interval,
    paired_difference_interval,
    resampled_interval,
    verdict,
)


def test_bootstrap_interval_covers_the_true_mean_in_about_95_percent_of_repeats():
    rng = np.random.default_rng(0)
    true_mean, repeats = 0.3, 200
    covered = sum(mean_interval(rng.exponential(true_mean, size=(60, 2)), resamples=500, seed=i).contains(true_mean)
                  for i in range(repeats))
    # Binomial(200, 0.95) lies in [180, 197] with probability > 0.99; a percentile bootstrap of a
    # skewed mean undercovers a little, never down to 90%.
    assert 180 <= covered <= 197, covered


def test_seeds_of_a_prompt_resample_together():
    rng = np.random.default_rng(1)
    prompt_effect = rng.normal(0, 1, size=(40, 1))
    values = prompt_effect + rng.normal(0, 0.01, size=(40, 8))        # 8 seeds that barely differ
    clustered = mean_interval(values, seed=0)
    as_if_independent = mean_interval(values.reshape(-1), seed=0)
    # 320 draws treated as independent shrink the interval by ~sqrt(8): a prompt's seeds are not new prompts.
    assert (clustered.high - clustered.low) > 2 * (as_if_independent.high - as_if_independent.low)


def test_paired_interval_of_two_identical_systems_contains_zero():
    rng = np.random.default_rng(2)
    scores = rng.normal(0.2, 0.05, size=(64, 3))
    same = paired_difference_interval(scores, scores.copy())
    assert same.estimate == 0 and same.contains(0)
    # two systems that only differ by independent noise of the same distribution
    noisy = paired_difference_interval(scores + rng.normal(0, 0.02, scores.shape),
                                       scores + rng.normal(0, 0.02, scores.shape))
    assert noisy.contains(0), noisy


def test_pairing_removes_the_shared_prompt_difficulty():
    rng = np.random.default_rng(3)
    difficulty = rng.normal(0, 1, size=100)
    a, b = difficulty + 0.1 + rng.normal(0, 0.05, 100), difficulty + rng.normal(0, 0.05, 100)
    paired = paired_difference_interval(a, b)
    unpaired_width = (mean_interval(a).high - mean_interval(a).low) + (mean_interval(b).high - mean_interval(b).low)
    assert paired.low > 0 and (paired.high - paired.low) < unpaired_width / 5


def test_paired_values_must_share_prompts_and_seeds():
    with pytest.raises(ValueError, match="share prompts and seeds"):
        paired_difference_interval(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="at least 2 prompts"):
        mean_interval(np.zeros(1))


def test_verdict_flips_when_a_known_effect_is_planted():
    rng = np.random.default_rng(4)
    baseline = rng.binomial(1, 0.2, size=(300, 2)).astype(float)         # R-precision hits of a no-kNN model
    same = baseline[:, ::-1]                                              # the same system, its seeds swapped
    better = np.clip(baseline + rng.binomial(1, 0.25, size=baseline.shape), 0, 1)  # a planted gain of ~0.2
    assert verdict(paired_difference_interval(same, baseline), +1) == Verdict.inconclusive
    assert verdict(paired_difference_interval(better, baseline), +1) == Verdict.reproduced
    assert verdict(paired_difference_interval(baseline, better), +1) == Verdict.contradicted
    assert verdict(paired_difference_interval(baseline, better), -1) == Verdict.reproduced  # "lower is better"


def test_verdict_reads_the_interval_not_the_estimate():
    assert verdict(Interval(0.5, -0.01, 1.0), +1) == Verdict.inconclusive
    assert verdict(Interval(0.01, 0.001, 0.02), +1) == Verdict.reproduced
    with pytest.raises(ValueError, match="expected_sign"):
        verdict(Interval(0, 0, 0), 0)


def test_fid_interval_by_resampling_images_separates_near_from_far():
    rng = np.random.default_rng(5)
    real = torch.from_numpy(rng.normal(0, 1, size=(300, 8)))
    near = torch.from_numpy(rng.normal(0.0, 1, size=(200, 8)))
    far = torch.from_numpy(rng.normal(0.5, 1, size=(200, 8)))
    near_ci = resampled_interval(len(near), lambda idx: fid(real, near[idx]), resamples=100)
    far_ci = resampled_interval(len(far), lambda idx: fid(real, far[idx]), resamples=100)
    assert near_ci.low <= near_ci.estimate <= near_ci.high
    assert near_ci.high < far_ci.low  # true FIDs ~0 vs ~2 (8 x 0.5^2), each CI far narrower than the gap
    # a paired FID difference on the same image indices (same prompts and seeds)
    difference = resampled_interval(200, lambda idx: fid(real, far[idx]) - fid(real, near[idx]), resamples=100)
    assert verdict(difference, +1) == Verdict.reproduced
