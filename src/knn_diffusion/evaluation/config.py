"""Params section of the ``evaluate`` stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from knn_diffusion.config_fields import between
from knn_diffusion.models.continuous.config import ContinuousSampler
from knn_diffusion.models.discrete.config import DiscreteSampler


@dataclass
class EvaluateGridConfig:
    """Inference-time settings scored without retraining; the grid is their product with the backbone's
    guidance scales (``evaluate.<model>.guidance``; k=0 once per guidance)."""

    k: list[int] = field(default_factory=lambda: [0, 1, 10], metadata=between(0, 1000))  # 0: no kNN at inference
    index_fraction: list[float] = field(default_factory=lambda: [0.3, 1.0], metadata=between(0, 1, low_open=True))
    # Indexes to retrieve from: the generator dataset's own, or a swapped one (e.g. noto).
    index: list[str] = field(default_factory=lambda: ["openmoji"])
    # Per-query score quantile q of retrieval.score_quantiles (paper Fig. 8; 0 = off, 1 = lowest scores).
    # Points with q > 0 also score the generated images and their neighbours (the report's Fig. 8 plot).
    score_quantile: list[int] = field(default_factory=lambda: [0], metadata=between(0, 100))


@dataclass
class ContinuousEvaluateSettings(ContinuousSampler):
    guidance: list[float] = field(default_factory=lambda: [8.0], metadata=between(0, 50))  # docs/defaults.md


@dataclass
class DiscreteEvaluateSettings(DiscreteSampler):
    guidance: list[float] = field(default_factory=lambda: [8.0], metadata=between(0, 50))  # paper: lambda = 8


@dataclass
class BootstrapConfig:
    """95% CIs of every metric: resamples of the prompts (a prompt's seeds together)."""

    resamples: int = field(default=1000, metadata=between(100))  # CLIP score, R-precision, paired differences
    set_resamples: int = field(default=200, metadata=between(20))  # FID and KID (each resample refits them)
    seed: int = 0


class JudgeChoice(str, Enum):
    judge = "judge"
    retrieval_encoder = "retrieval_encoder"


class HeldOutSplit(str, Enum):
    """Where evaluate draws its prompts and reference images: ``val`` to choose settings, ``test`` to report."""

    test = "test"
    val = "val"


@dataclass
class EvaluateConfig:
    # The generator dataset's held-out split evaluated: test reports, val chooses settings (never tune on test).
    split: HeldOutSplit = HeldOutSplit.test
    # One prompt per line, a file under prompts/ (a declared dep). Empty: captions of the generator
    # dataset's held-out split, with their images as the paired reference set. The FID/KID reference is that
    # split's images either way.
    prompts_file: str = ""
    # Prompts and reference images: 0 = every captioned image of the split (the study: all 358 named test images).
    count: int = field(default=64, metadata=between(0))
    seeds: int = field(default=1, metadata=between(1, 100))  # images per prompt and grid point
    seed: int = 0  # draws the held-out prompts/images; image s * P + p (prompt p, seed s) from noise seed + s * P + p
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    batch_size: int = field(default=64, metadata=between(1))
    grid: EvaluateGridConfig = field(default_factory=EvaluateGridConfig)
    # Per backbone (the stage's ``--model``; dvc.yaml declares only that one's key): its sampler and
    # the guidance scales of the grid.
    continuous: ContinuousEvaluateSettings = field(default_factory=ContinuousEvaluateSettings)
    discrete: DiscreteEvaluateSettings = field(default_factory=DiscreteEvaluateSettings)
    retrieval_baseline: bool = True  # score the first retrieved image per prompt (paper Fig. 2) as well
    # FID/KID features: Inception-v3 from this local file (torch-fidelity's pt_inception-2015-12-05), or,
    # when empty, the image tower of the judge below.
    inception_weights: str = ""
    # Who scores the images (CLIP score, R-precision, default FID features): the judge stage's model
    # (params section `judge`: an aligned model on other styles, or any open_clip), or - circular, for
    # comparison only - the retrieval encoder that also built the condition.
    judge: JudgeChoice = JudgeChoice.judge
    kid_subsets: int = field(default=100, metadata=between(1))
    kid_subset_size: int = field(default=50, metadata=between(2))
    r_precision_candidates: int = field(default=20, metadata=between(2))  # R: own prompt + R-1 distractors
    r_precision_seed: int = 0
    grid_prompts: int = field(default=8, metadata=between(1))  # rows of the prompts x settings image
