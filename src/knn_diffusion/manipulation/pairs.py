"""Training pairs for mask-free manipulation (paper Sec. 3.1, supplement Fig. 19).

For a training image I: a random local area M (an axis-aligned box, seeded per image), I's first
nearest neighbour nn in the encoder's image space (the ``knn`` stage's table: never I itself nor a
duplicate), nn aligned to I with OpenCV's ECC (Evangelidis & Psarakis 2008), and

    I_manip = I * (1 - M) + align(nn) * M

so I_manip equals I exactly outside M. A neighbour that ECC cannot align (no convergence, or a final
correlation below ``min_correlation``) makes no pair: it is skipped and counted, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

from knn_diffusion.manipulation.config import MotionModel, PairsConfig, RegionView

MOTION = {MotionModel.translation: cv2.MOTION_TRANSLATION, MotionModel.euclidean: cv2.MOTION_EUCLIDEAN,
          MotionModel.affine: cv2.MOTION_AFFINE, MotionModel.homography: cv2.MOTION_HOMOGRAPHY}


class AlignmentFailed(Exception):
    """ECC found no warp (it did not converge, or the aligned images do not correlate)."""


def random_box(side: int, rng: np.random.Generator, min_size: float, max_size: float) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a box whose height and width are each a uniform fraction in
    [min_size, max_size] of the side, placed uniformly inside the image."""
    height, width = (max(1, int(round(rng.uniform(min_size, max_size) * side))) for _ in range(2))
    top, left = int(rng.integers(0, side - height + 1)), int(rng.integers(0, side - width + 1))
    return top, left, top + height, left + width


def box_mask(side: int, box: Sequence[int]) -> np.ndarray:
    """bool (side, side), True inside ``box``."""
    mask = np.zeros((side, side), dtype=bool)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = True
    return mask


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0


def ecc_align(reference: np.ndarray, moving: np.ndarray, motion: MotionModel = MotionModel.affine,
              iterations: int = 100, epsilon: float = 1e-5, min_correlation: float = 0.0
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """Warp ``moving`` (uint8 (H, W, 3)) onto ``reference`` with ``cv2.findTransformECC``.

    Returns (aligned uint8 (H, W, 3), warp (3, 3) mapping reference pixel coordinates to ``moving``'s,
    final correlation coefficient). Raises :class:`AlignmentFailed` when ECC does not converge or the
    correlation is below ``min_correlation``.
    """
    motion = MotionModel(motion)
    warp = np.eye(3, dtype=np.float32) if motion == MotionModel.homography else np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, epsilon)
    try:
        correlation, warp = cv2.findTransformECC(_gray(reference), _gray(moving), warp, MOTION[motion], criteria,
                                                 None, 5)
    except cv2.error as err:  # "The algorithm stopped before its convergence" / uncorrelated images
        raise AlignmentFailed(str(err).strip().splitlines()[-1]) from None
    if not np.isfinite(correlation) or correlation < min_correlation:
        raise AlignmentFailed(f"correlation {correlation:.3f} below min_correlation {min_correlation}")
    if warp.shape[0] == 2:
        warp = np.vstack([warp, [0, 0, 1]]).astype(np.float32)
    return apply_warp(moving, warp), warp, float(correlation)


def apply_warp(moving: np.ndarray, warp: np.ndarray) -> np.ndarray:
    """``moving`` resampled on the reference grid through ``warp`` (3, 3): reference -> moving coordinates."""
    height, width = moving.shape[:2]
    return cv2.warpPerspective(np.ascontiguousarray(moving), np.asarray(warp, dtype=np.float32), (width, height),
                               flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


def compose(image: np.ndarray, replacement: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """I * (1 - M) + replacement * M for a binary mask: ``image``'s own pixels wherever M is 0."""
    return np.where(mask[..., None], replacement, image)


def masked_view(image: np.ndarray, box: Sequence[int], background: Sequence[int]) -> np.ndarray:
    """I * M with the dataset's background colour outside M (the local area where it was, same size)."""
    view = np.empty_like(image)
    view[:] = np.asarray(background, dtype=image.dtype)
    return compose(view, image, box_mask(image.shape[0], box))


def crop_view(image: np.ndarray, box: Sequence[int], background: Sequence[int]) -> np.ndarray:
    """The local area cropped and resized back to the image's size."""
    top, left, bottom, right = box
    side = image.shape[0]
    return cv2.resize(np.ascontiguousarray(image[top:bottom, left:right]), (side, side), interpolation=cv2.INTER_AREA)


# How the image that M's embedding f_img(I * M) is taken of looks (manipulation_pairs.region_view).
REGION_VIEWS: dict[RegionView, Callable[[np.ndarray, Sequence[int], Sequence[int]], np.ndarray]] = {
    RegionView.masked: masked_view, RegionView.crop: crop_view}


@dataclass
class PairSet:
    """The pairs that were made, in the order of the training rows they came from."""

    rows: list[int] = field(default_factory=list)         # I's image row
    neighbours: list[int] = field(default_factory=list)   # nn's image row
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    warps: list[np.ndarray] = field(default_factory=list)  # (3, 3) each
    correlations: list[float] = field(default_factory=list)
    manipulated: list[np.ndarray] = field(default_factory=list)  # uint8 (H, W, 3) each
    residual_before: list[float] = field(default_factory=list)  # mean |gray(I) - gray(nn)| in [0, 1]
    residual_after: list[float] = field(default_factory=list)   # the same with nn aligned
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def skipped(self) -> int:
        return sum(self.failures.values())


def build_pairs(images: Callable[[int], np.ndarray], rows: np.ndarray, first_neighbours: np.ndarray,
                cfg: PairsConfig) -> PairSet:
    """One pair per training row whose first neighbour aligns; ``images(row)`` -> uint8 (H, W, 3).

    The box of row r depends only on (cfg.seed, r), so a pair does not change when others are added.
    """
    pairs = PairSet()
    for row, neighbour in zip(np.asarray(rows).tolist(), np.asarray(first_neighbours).tolist()):
        image, other = images(row), images(neighbour)
        box = random_box(image.shape[0], np.random.default_rng([cfg.seed, row]), cfg.min_size, cfg.max_size)
        try:
            aligned, warp, correlation = ecc_align(image, other, cfg.motion, cfg.iterations, cfg.epsilon,
                                                   cfg.min_correlation)
        except AlignmentFailed as err:
            reason = "low_correlation" if "min_correlation" in str(err) else "not_converged"
            pairs.failures[reason] = pairs.failures.get(reason, 0) + 1
            continue
        pairs.rows.append(row)
        pairs.neighbours.append(neighbour)
        pairs.boxes.append(box)
        pairs.warps.append(warp)
        pairs.correlations.append(correlation)
        pairs.manipulated.append(compose(image, aligned, box_mask(image.shape[0], box)))
        pairs.residual_before.append(float(np.abs(_gray(image) - _gray(other)).mean()))
        pairs.residual_after.append(float(np.abs(_gray(image) - _gray(aligned)).mean()))
    return pairs
