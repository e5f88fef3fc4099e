"""CIs of the evaluate metrics from per-image values (evaluation/intervals.py): the refitted FID is
torchmetrics' FID, every estimate lies in its interval, pairs of identical points differ by exactly 0,
and a planted shift of the generated features is found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knn_diffusion.evaluation.intervals import PointScores, Reference, paired_differences, point_intervals
from knn_diffusion.evaluation.metrics import KidSettings, fid, kid

RNG = np.random.default_rng(0)
REFERENCE = RNG.normal(size=(60, 8))


def point(shift: float = 0.0, prompts: int = 30, seeds: int = 2, seed: int = 1) -> PointScores:
    rng = np.random.default_rng(seed)
    return PointScores.from_rows(rng.uniform(0, 0.4, prompts * seeds), rng.integers(0, 2, prompts * seeds),
                                 rng.normal(shift, 1.0, size=(prompts * seeds, 8)), seeds)


def test_refitted_fid_is_torchmetrics_fid():
    scores = point()
    expected = fid(torch.from_numpy(REFERENCE), torch.from_numpy(scores.features.astype(np.float64)))
    assert Reference(REFERENCE).fid(scores.features) == pytest.approx(expected, rel=1e-6)


def test_rows_of_a_resample_take_every_seed_of_its_prompts():
    scores = point(prompts=5, seeds=3)
    assert scores.rows(np.array([1, 1, 4])).tolist() == [1, 1, 4, 6, 6, 9, 11, 11, 14]
    assert scores.clip.shape == (5, 3)


def test_every_estimate_lies_in_its_interval(tmp_path):
    scores = point()
    scores.save(tmp_path)
    loaded = PointScores.load(tmp_path)
    assert np.array_equal(loaded.features, scores.features) and np.array_equal(loaded.hits, scores.hits)
    real, fake = torch.from_numpy(REFERENCE), torch.from_numpy(scores.features.astype(np.float64))
    values = {"fid": fid(real, fake), "kid_mean": kid(real, fake, KidSettings(20, 20))[0],
              "clip_score": scores.clip.mean(), "r_precision": scores.hits.mean()}
    bounds = point_intervals(loaded, Reference(REFERENCE), values, resamples=200, set_resamples=50)
    for metric, value in values.items():
        assert bounds[f"{metric}_ci_low"] < value < bounds[f"{metric}_ci_high"], metric


def test_paired_differences_of_one_point_are_zero_and_a_planted_shift_is_found():
    reference, same = Reference(REFERENCE), point()
    for interval in paired_differences(same, same, reference, resamples=200, set_resamples=50).values():
        assert interval.estimate == 0 and interval.contains(0)
    shifted = paired_differences(point(shift=1.5), same, reference, resamples=200, set_resamples=50)["fid"]
    assert shifted.low > 0  # features moved away from the reference: FID rises, and the CI says so
    with pytest.raises(ValueError, match="share prompts and seeds"):
        paired_differences(point(seeds=1, prompts=60), same, reference, resamples=200, set_resamples=50)
