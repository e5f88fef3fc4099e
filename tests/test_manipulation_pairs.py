"""Manipulation training pairs: OpenCV ECC alignment, I_manip = I * (1 - M) + align(nn) * M, skipped pairs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from knn_diffusion.manipulation.config import MotionModel, PairsConfig
from knn_diffusion.manipulation.pairs import AlignmentFailed, box_mask, build_pairs, compose, ecc_align, random_box


def blobs(side: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colour image (Gaussian blobs): enough texture for ECC, no aliasing under a warp."""
    y, x = np.mgrid[:side, :side].astype(np.float32)
    image = np.zeros((side, side, 3), np.float32)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        (cy, cx), spread, colour = rng.uniform(10, side - 10, 2), rng.uniform(4, 9), rng.uniform(0, 255, 3)
        image += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * spread ** 2))[..., None] * colour
    return np.clip(image, 0, 255).astype(np.uint8)


def corner_error(found: np.ndarray, truth: np.ndarray, side: int = 64, margin: int = 8) -> float:
    """Largest displacement (px) between two warps at points ``margin`` inside the image's corners."""
    lo, hi = margin, side - margin
    points = np.array([[lo, lo, 1], [hi, lo, 1], [lo, hi, 1], [hi, hi, 1]], np.float32).T  # (3, 4)
    return float(np.abs((found @ points)[:2] - (truth @ points)[:2]).max())


@pytest.mark.parametrize("motion, truth", [
    (MotionModel.translation, [[1, 0, 2.5], [0, 1, -1.5]]),
    (MotionModel.affine, [[1.05, 0.04, -1.2], [-0.03, 0.97, 1.8]]),
])
def test_ecc_recovers_a_known_warp_within_one_pixel(motion, truth):
    reference = blobs()
    truth = np.vstack([np.asarray(truth, np.float32), [0, 0, 1]])
    moving = cv2.warpAffine(reference, truth[:2], (64, 64), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    aligned, warp, correlation = ecc_align(reference, moving, motion)
    assert corner_error(warp, truth) < 1.0
    assert correlation > 0.99
    inner = (slice(8, 56), slice(8, 56))
    assert np.abs(aligned[inner].astype(int) - reference[inner]).mean() < 2  # the warp undone, in pixels


def test_manipulated_image_equals_the_original_outside_the_box():
    original, other = blobs(seed=0), blobs(seed=1)
    box = random_box(64, np.random.default_rng(3), 0.3, 0.6)
    mask = box_mask(64, box)
    manipulated = compose(original, other, mask)
    assert np.array_equal(manipulated[~mask], original[~mask])
    assert np.array_equal(manipulated[mask], other[mask])
    assert 0.3 * 64 - 1 <= box[2] - box[0] <= 0.6 * 64 + 1 and 0 <= box[0] and box[2] <= 64


@pytest.mark.parametrize("unalignable, reason", [
    (np.full((64, 64, 3), 255, np.uint8), "not_converged"),  # a blank neighbour: no gradient to follow
    (np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(np.uint8), "not_converged"),  # noise
])
def test_an_unalignable_pair_is_skipped_and_counted(unalignable, reason):
    with pytest.raises(AlignmentFailed):
        ecc_align(blobs(), unalignable)
    shifted = np.roll(blobs(seed=0), 2, axis=1)
    images = {0: blobs(seed=0), 1: blobs(seed=2), 2: unalignable, 3: shifted}
    # Row 0's neighbour is its shifted copy (aligns), row 1's the unalignable image.
    pairs = build_pairs(images.__getitem__, np.array([0, 1]), np.array([3, 2]), PairsConfig(min_correlation=0.0))
    assert pairs.failures.get(reason) == 1 and pairs.skipped == 1
    assert pairs.rows == [0] and len(pairs.manipulated) == 1
    mask = box_mask(64, pairs.boxes[0])
    assert np.array_equal(pairs.manipulated[0][~mask], images[0][~mask])


def test_a_low_correlation_after_alignment_is_skipped_as_such():
    pairs = build_pairs({0: blobs(seed=0), 1: blobs(seed=5)}.__getitem__, np.array([0]), np.array([1]),
                        PairsConfig(motion=MotionModel.translation, min_correlation=0.999))
    assert pairs.rows == [] and sum(pairs.failures.values()) == 1


def test_boxes_depend_only_on_seed_and_row():
    cfg = PairsConfig(seed=7)
    images = {r: blobs(seed=r % 2) for r in range(4)}
    one = build_pairs(images.__getitem__, np.array([2]), np.array([2]), cfg)
    both = build_pairs(images.__getitem__, np.array([0, 2]), np.array([0, 2]), cfg)
    assert one.boxes[0] == both.boxes[1]
