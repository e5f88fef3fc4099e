"""Configs of the continuous backbone: its constructor config (stored in every checkpoint), its samplers
and its params sections (``train_continuous``, the ``continuous`` keys of ``sample`` / ``evaluate``).

No torch here: ``knn_diffusion.config`` assembles the params schema from these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from knn_diffusion.config_fields import ConfigError, between
from knn_diffusion.models.config import ConditioningConfig, ConditioningVariant, config_to_dict, read_preset
from knn_diffusion.training.config import Precision

BACKBONE = "continuous"  # recorded in every checkpoint, so a loader can tell the backbones apart


class BetaSchedule(str, Enum):
    linear = "linear"                        # Ho et al. (2020)
    squaredcos_cap_v2 = "squaredcos_cap_v2"  # Nichol & Dhariwal (2021) cosine; better at low resolution


class SchedulerName(str, Enum):
    """Samplers from diffusers; all share the training noise schedule."""

    ddpm = "ddpm"
    ddim = "ddim"
    dpm_solver_pp = "dpm_solver_pp"  # DPMSolverMultistepScheduler, algorithm_type="dpmsolver++"
    # The stochastic variant ("sde-dpmsolver++"): like DDPM, its fresh noise hides the eps errors of a
    # small, briefly trained model that deterministic samplers (DDIM, dpm_solver_pp) turn into speckle.
    dpm_solver_pp_sde = "dpm_solver_pp_sde"


@dataclass
class ContinuousSampler:
    """How the continuous backbone samples at inference (``sample``, ``evaluate``): a diffusers scheduler."""

    scheduler: SchedulerName = SchedulerName.dpm_solver_pp_sde  # cleanest on small models (see sampler.py)
    steps: int = field(default=25, metadata=between(1, 1000))

    def generator_options(self) -> dict:
        """Keyword arguments of ``generation.load_generator`` for this backbone."""
        return {"scheduler": self.scheduler}


@dataclass
class UNetConfig:
    """A diffusers ``UNet2DConditionModel`` in pixel space (3 channels in and out).

    One entry of ``block_out_channels`` / ``attention`` per resolution level; each level after the
    first halves the resolution. ``attention[i]`` puts self- + cross-attention transformer blocks at
    level i (the paper attends at 32, 16 and 8 px of a 64 px image: [false, true, true, true]).
    """

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention: list[bool] = field(default_factory=lambda: [False, False, True])
    layers_per_block: int = field(default=1, metadata=between(1, 8))
    head_channels: int = field(default=32, metadata=between(8, 512))  # paper: 64
    cross_attention_dim: int = field(default=64, metadata=between(8, 4096))  # token width
    norm_num_groups: int = field(default=8, metadata=between(1, 64))
    # Pixel side the network is built for; the data's resolution, not part of a preset.
    resolution: int = field(default=32, metadata=between(8, 1024))


@dataclass
class NoiseConfig:
    """The forward process; samplers are rebuilt from it, so it travels with the weights."""

    num_train_timesteps: int = field(default=1000, metadata=between(10, 10000))
    beta_schedule: BetaSchedule = BetaSchedule.squaredcos_cap_v2


@dataclass
class DenoiserConfig:
    """Everything the continuous model's constructor needs (stored in every checkpoint)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "DenoiserConfig":
        try:
            noise = dict(raw["noise"])
            noise["beta_schedule"] = BetaSchedule(noise["beta_schedule"])
            return cls(unet=UNetConfig(**raw["unet"]), conditioning=ConditioningConfig.from_dict(raw["conditioning"]),
                       noise=NoiseConfig(**noise))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"model config: {err!s}; expected the keys of DenoiserConfig "
                              "(unet, conditioning, noise)") from None


def load_unet_preset(name: str, resolution: int) -> UNetConfig:
    """A U-Net preset by name, or by the path of a JSON file of the same form (a custom architecture)."""
    config, where = read_preset("unet", name, UNetConfig, resolution=resolution)
    validate_unet(config, where=where)
    return config


def validate_unet(config: UNetConfig, where: str = "unet") -> None:
    """The shape rules diffusers would otherwise report deep inside its constructor."""
    levels = len(config.block_out_channels)
    if len(config.attention) != levels:
        raise ConfigError(f"{where}: 'attention' has {len(config.attention)} entries, expected one per "
                          f"level of block_out_channels ({levels})")
    if config.resolution % 2 ** (levels - 1):
        raise ConfigError(f"{where}: resolution {config.resolution} is not divisible by "
                          f"2**{levels - 1} (one halving per level after the first)")
    for channels in config.block_out_channels:
        if channels % config.norm_num_groups:
            raise ConfigError(f"{where}: block_out_channels entry {channels} is not divisible by "
                              f"norm_num_groups={config.norm_num_groups}")


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
