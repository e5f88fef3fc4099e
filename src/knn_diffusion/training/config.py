"""Params sections of the training stages: ``train_continuous``, ``tokenizer``, ``train_discrete`` (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from knn_diffusion.config_fields import between
from knn_diffusion.models.config import BetaSchedule, ConditioningVariant, SchedulerName
from knn_diffusion.models.discrete.config import TransitionConfig, VQConfig


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on a GPU that supports it, else fp16 on a GPU, fp32 on the CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # with a gradient scaler


@dataclass
class EvalSamplingConfig:
    """How the sample grids logged during training are drawn (from fixed eval conditions)."""

    scheduler: SchedulerName = SchedulerName.dpm_solver_pp_sde
    steps: int = field(default=25, metadata=between(1, 1000))
    guidance: float = field(default=3.0, metadata=between(0, 50))
    seed: int = 0


@dataclass
class ContinuousTrainConfig:
    preset: str = "tiny"  # a name from knn_diffusion.models.config.list_presets()
    variant: ConditioningVariant = ConditioningVariant.tokens
    k: int = field(default=10, metadata=between(0, 256))  # paper: 10
    # Probability of training a sample on the null condition. 0 is the paper's setting (6.7): guidance
    # still works, the null condition y'=0 is used at sampling only (tests/test_guidance.py measures it).
    cond_dropout: float = field(default=0.0, metadata=between(0, 1))
    batch_size: int = field(default=32, metadata=between(1))  # global, split over DDP ranks
    max_steps: int = field(default=1200, metadata=between(1))  # tiny, 32 px, 2 idle CPU cores: ~5 min
    lr: float = field(default=1e-3, metadata=between(0, 1, low_open=True))
    warmup_steps: int = field(default=50, metadata=between(0))
    weight_decay: float = field(default=0.0, metadata=between(0, 1))
    grad_clip: float = field(default=1.0, metadata=between(0))  # 0 disables
    # diffusers EMAModel warms the decay up as min(decay, (1+step)/(10+step)).
    ema_decay: float = field(default=0.999, metadata=between(0, 1))
    precision: Precision = Precision.auto
    num_train_timesteps: int = field(default=1000, metadata=between(10, 10000))
    beta_schedule: BetaSchedule = BetaSchedule.squaredcos_cap_v2
    hflip: bool = False  # emoji and text-bearing stickers change meaning when mirrored
    seed: int = 0
    checkpoint_every: int = field(default=200, metadata=between(1))
    keep_checkpoints: int = field(default=2, metadata=between(1))  # step checkpoints kept within a run
    # Resumable state folders (one per resume key, under checkpoints/train_continuous/) kept, the
    # current one included; older ones are deleted when a run starts.
    keep_runs: int = field(default=2, metadata=between(1))
    log_every: int = field(default=10, metadata=between(1))
    sample_every: int = field(default=400, metadata=between(0))  # 0: only at the end
    num_workers: int = field(default=0, metadata=between(0, 64))
    # >1: the stage relaunches itself under torchrun with this many processes (DDP; gloo on CPU).
    nproc_per_node: int = field(default=1, metadata=between(1, 64))
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)


@dataclass
class TokenizerConfig:
    """The ``tokenizer`` params section. With ``pretrained`` set nothing is trained (``vq`` and the
    training keys are unused): the VQ comes from that file or folder and is only remapped and measured."""

    pretrained: str = ""  # a taming-transformers VQGAN .ckpt or a diffusers VQModel folder; empty: train one
    pretrained_config: str = ""  # the .ckpt's taming config YAML; empty: config.yaml beside it or ../configs/
    vq: VQConfig = field(default_factory=VQConfig)
    steps: int = field(default=400, metadata=between(1))
    batch_size: int = field(default=32, metadata=between(1))
    lr: float = field(default=3e-3, metadata=between(0, 1, low_open=True))
    commitment: float = field(default=0.25, metadata=between(0, 10))  # beta of ||z - sg(e)||^2
    seed: int = 0
    log_every: int = field(default=20, metadata=between(1))
    encode_batch: int = field(default=256, metadata=between(1))


class TimestepSampling(str, Enum):
    uniform = "uniform"
    importance = "importance"  # p(n) ~ sqrt(E[L_n^2]) after a uniform warm-up (Nichol & Dhariwal 2021)


@dataclass
class DiscreteSamplingConfig:
    """How the sample grids logged during training are drawn (from fixed eval conditions)."""

    steps: int = field(default=25, metadata=between(1, 10000))  # <= transition.steps; fewer: strided
    guidance: float = field(default=8.0, metadata=between(0, 50))  # paper: lambda = 8
    truncation: float = field(default=1.0, metadata=between(0, 1, low_open=True))  # keep top-r mass; 1: off
    seed: int = 0


@dataclass
class DiscreteTrainConfig:
    """The ``train_discrete`` section; shared keys mean the same as in ``train_continuous``."""

    preset: str = "tiny"  # a name from list_presets("transformer") or a .json path
    variant: ConditioningVariant = ConditioningVariant.tokens
    k: int = field(default=10, metadata=between(0, 256))
    cond_dropout: float = field(default=0.0, metadata=between(0, 1))  # paper: 0 (null condition untrained)
    batch_size: int = field(default=32, metadata=between(1))
    max_steps: int = field(default=800, metadata=between(1))  # tiny, 8x8 tokens, 2 CPU cores: 1.5-3 min
    lr: float = field(default=2e-3, metadata=between(0, 1, low_open=True))
    warmup_steps: int = field(default=50, metadata=between(0))
    weight_decay: float = field(default=0.0, metadata=between(0, 1))
    grad_clip: float = field(default=1.0, metadata=between(0))
    ema_decay: float = field(default=0.999, metadata=between(0, 1))
    precision: Precision = Precision.auto
    transition: TransitionConfig = field(default_factory=TransitionConfig)
    aux_weight: float = field(default=1.0, metadata=between(0))  # VQ-Diffusion: 5e-4 of a summed loss
    timestep_sampling: TimestepSampling = TimestepSampling.uniform
    seed: int = 0
    checkpoint_every: int = field(default=250, metadata=between(1))
    keep_checkpoints: int = field(default=2, metadata=between(1))
    keep_runs: int = field(default=2, metadata=between(1))  # resumable state folders kept (as train_continuous)
    log_every: int = field(default=10, metadata=between(1))
    sample_every: int = field(default=0, metadata=between(0))  # 0: only at the end
    num_workers: int = field(default=0, metadata=between(0, 64))
    nproc_per_node: int = field(default=1, metadata=between(1, 64))
    sampling: DiscreteSamplingConfig = field(default_factory=DiscreteSamplingConfig)
