"""Params sections of text-guided manipulation: ``manipulation_pairs``, ``train_manipulation``, ``edit``,
``evaluate_manipulation`` (no torch or OpenCV here). The choices the paper leaves open are argued in
docs/architecture.md ("Mask-free manipulation")."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from knn_diffusion.config_fields import between
from knn_diffusion.models.continuous.config import SchedulerName
from knn_diffusion.training.config import Precision


class MotionModel(str, Enum):
    """OpenCV ECC motion models (``cv2.MOTION_*``)."""

    translation = "translation"
    euclidean = "euclidean"
    affine = "affine"
    homography = "homography"


class RegionView(str, Enum):
    """What f_img(I * M) is taken of."""

    masked = "masked"  # the image with the dataset's background colour outside M (M where it is, same scale)
    crop = "crop"      # M's box cut out and resized to the full image


@dataclass
class PairsConfig:
    """The ``manipulation_pairs`` stage: I, a random box M, ECC-aligned first neighbour -> I_manip."""

    seed: int = 0  # box of image row r: numpy default_rng([seed, r])
    min_size: float = field(default=0.3, metadata=between(0.05, 1))  # box height/width, fraction of the side
    max_size: float = field(default=0.6, metadata=between(0.05, 1))
    motion: MotionModel = MotionModel.affine
    iterations: int = field(default=100, metadata=between(1, 10000))  # ECC termination: count ...
    epsilon: float = field(default=1e-5, metadata=between(0, 1, low_open=True))  # ... or correlation change
    # A pair whose aligned neighbour correlates with I below this is skipped (counted as low_correlation).
    min_correlation: float = field(default=0.3, metadata=between(-1, 1))
    region_view: RegionView = RegionView.masked
    k: int = field(default=10, metadata=between(0, 256))  # neighbours of f_img(I * M) fed beside it (as trained)
    preview: int = field(default=16, metadata=between(1, 256))  # rows of the MLflow preview grid


@dataclass
class EditSampler:
    """How an edit is sampled: classifier-free guidance on the text condition; the input image is kept
    in both halves of the guided batch."""

    guidance: float = field(default=3.0, metadata=between(0, 50))
    scheduler: SchedulerName = SchedulerName.dpm_solver_pp_sde
    steps: int = field(default=25, metadata=between(1, 1000))
    seed: int = 0


@dataclass
class ManipulationTrainConfig:
    """The ``train_manipulation`` section: fine-tunes ``models/continuous`` (its architecture, k and noise
    schedule) on the pairs; the keys mean the same as in ``train_continuous``."""

    cond_dropout: float = field(default=0.1, metadata=between(0, 1))  # trains the null text path of guidance
    batch_size: int = field(default=32, metadata=between(1))
    max_steps: int = field(default=300, metadata=between(1))  # tiny, 32 px, 2 CPU cores: about 1.5 min
    lr: float = field(default=5e-4, metadata=between(0, 1, low_open=True))
    warmup_steps: int = field(default=20, metadata=between(0))
    weight_decay: float = field(default=0.0, metadata=between(0, 1))
    grad_clip: float = field(default=1.0, metadata=between(0))
    ema_decay: float = field(default=0.99, metadata=between(0, 1))
    precision: Precision = Precision.auto
    seed: int = 0
    checkpoint_every: int = field(default=100, metadata=between(1))
    keep_checkpoints: int = field(default=2, metadata=between(1))
    keep_runs: int = field(default=2, metadata=between(1))
    log_every: int = field(default=10, metadata=between(1))
    sample_every: int = field(default=0, metadata=between(0))  # 0: only at the end
    num_workers: int = field(default=0, metadata=between(0, 64))
    nproc_per_node: int = field(default=1, metadata=between(1, 64))
    sampling: EditSampler = field(default_factory=EditSampler)  # preview edits of held-out pairs


@dataclass
class EvaluateManipulationConfig:
    """The ``evaluate_manipulation`` stage: held-out test images x held-out edit prompts."""

    prompts_file: str = "prompts/edits.txt"  # under prompts/ (a declared dep)
    images: int = field(default=8, metadata=between(1))  # test-split images edited with every prompt
    seed: int = 0
    # A pixel belongs to the changed region when its mean absolute RGB difference to the input exceeds
    # this (0-255); identity (SSIM/PSNR) is measured outside that region.
    change_threshold: float = field(default=24.0, metadata=between(0, 255))
    grid_rows: int = field(default=8, metadata=between(1))
