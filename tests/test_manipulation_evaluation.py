"""Edit scores: identity outside the changed region (from the difference map), CLIP-score gain, CIs."""

from __future__ import annotations

import numpy as np
import pytest

from knn_diffusion.manipulation.evaluation import PSNR_CAP, changed_region, identity_scores, summarise, text_scores
from knn_diffusion.stages.evaluate_manipulation import intervals
from tests.continuous_helpers import square_images


def test_identity_is_measured_outside_the_region_that_changed():
    inputs = square_images(3, 32, seed=0)
    edited = inputs.copy()
    edited[0, 4:12, 4:12] = 0  # a local edit (strong enough to cross the threshold)
    edited[1] = 255 - edited[1]  # everything changed: nothing outside to score
    noisy = edited[2].astype(int) + np.random.default_rng(0).integers(-5, 6, edited[2].shape)
    edited[2] = np.clip(noisy, 0, 255)  # small changes everywhere, all below the threshold
    changed = changed_region(inputs, edited, threshold=24)
    assert changed[0].sum() <= 64 and changed[0, 4:12, 4:12].any() and not changed[0, 16:].any()
    scores = identity_scores(inputs, edited, threshold=24)
    assert scores["changed_fraction"][2] == 0 and scores["changed_fraction"][1] > 0.5
    assert scores["psnr_outside"][0] == PSNR_CAP  # untouched outside the edit
    assert scores["ssim_outside"][0] > scores["ssim"][0]
    assert np.isnan(scores["ssim_outside"][1]) or scores["changed_fraction"][1] < 1
    assert scores["psnr_outside"][2] < 45  # noise below the threshold still lowers identity
    summary = summarise(scores)
    assert summary["scored_outside"] == 3 - int(np.isnan(scores["ssim_outside"]).sum())
    same = identity_scores(inputs, inputs.copy(), threshold=24)
    assert (same["ssim"] == pytest.approx(1.0)) and (same["psnr"] == PSNR_CAP).all()


class OneHotJudge:
    """Image embedding: the normalised mean colour; text embedding: a fixed unit vector per word."""

    def encode_images(self, images):
        colours = images.reshape(len(images), -1, 3).mean(1)
        return colours / np.linalg.norm(colours, axis=1, keepdims=True)

    def encode_texts(self, texts):
        table = {"red": [1.0, 0, 0], "blue": [0, 0, 1.0]}
        return np.array([table[t] for t in texts])


def test_clip_gain_is_the_score_change_over_the_input():
    grey = np.full((2, 4, 4, 3), 128, np.uint8)
    red = grey.copy()
    red[..., 0] = 255
    scores = text_scores(OneHotJudge(), grey, red, ["red", "blue"])
    assert scores["clip_gain"][0] > 0 > scores["clip_gain"][1]
    assert scores["clip_score"][0] == pytest.approx(scores["clip_gain"][0] + 1 / np.sqrt(3))


def test_intervals_over_images_and_paired_differences():
    rng = np.random.default_rng(0)
    edit = {name: rng.normal(0.3, 0.1, 12) for name in ("clip_score", "clip_gain", "changed_fraction", "ssim_outside",
                                                       "psnr_outside", "ssim")}
    same = {name: np.zeros(12) for name in edit}
    found = intervals(edit, images=4, seed=0)
    assert found["clip_gain_ci_low"] < found["clip_gain"] < found["clip_gain_ci_high"]
    assert intervals(same, images=4, seed=0)["ssim_ci_low"] == 0  # constant: the value itself
    paired = intervals(edit, images=4, seed=0, baseline=same)
    assert paired["clip_gain"] == pytest.approx(edit["clip_gain"].mean())
    edit["ssim_outside"][0] = np.nan  # no unchanged part in one edit: that metric gets no interval
    assert "ssim_outside" not in intervals(edit, images=4, seed=0) and intervals(edit, images=1, seed=0) == {}
