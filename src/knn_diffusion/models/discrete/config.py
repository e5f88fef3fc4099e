"""Configs of the discrete backbone: its constructor config (stored in every checkpoint), its sampler and
its params sections (``tokenizer``, ``train_discrete``, the ``discrete`` keys of ``sample`` / ``evaluate``).

No torch here: ``knn_diffusion.config`` assembles the params schema from these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from knn_diffusion.config_fields import ConfigError, between
from knn_diffusion.models.config import ConditioningConfig, ConditioningVariant, config_to_dict, read_preset
from knn_diffusion.training.config import Precision

DISCRETE = "discrete"  # the backbone's name in checkpoints, dvc.yaml items and params


@dataclass
class TransitionConfig:
    """Cumulative schedules, linear in n from step 1 to step N (VQ-Diffusion's defaults)."""

    steps: int = field(default=100, metadata=between(2, 10000))  # N (paper: 100)
    alpha_bar_start: float = field(default=0.99999, metadata=between(0, 1))  # alpha_bar_1: kept unchanged
    alpha_bar_end: float = field(default=0.000009, metadata=between(0, 1))   # alpha_bar_N
    gamma_bar_start: float = field(default=0.000009, metadata=between(0, 1))  # gamma_bar_1: masked
    gamma_bar_end: float = field(default=0.99999, metadata=between(0, 1))     # gamma_bar_N


@dataclass
class VQConfig:
    """Architecture: each entry of ``block_out_channels`` after the first halves the side."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 32])  # 32 px -> 8x8 tokens
    layers_per_block: int = field(default=1, metadata=between(1, 8))
    mid_attention: bool = False  # self-attention in the bottleneck (VQGAN has it; costly on a CPU)
    codebook_size: int = field(default=256, metadata=between(2, 65536))
    embed_dim: int = field(default=16, metadata=between(1, 1024))  # codebook vector size
    norm_num_groups: int = field(default=8, metadata=between(1, 64))

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class TransformerConfig:
    """Decoder-only transformer over a token map; the preset fields plus the data-derived ones."""

    n_layer: int = field(default=4, metadata=between(1, 128))
    n_embd: int = field(default=128, metadata=between(8, 8192))
    n_head: int = field(default=4, metadata=between(1, 128))
    mlp_ratio: int = field(default=4, metadata=between(1, 16))
    dropout: float = field(default=0.0, metadata=between(0, 1))
    # From the tokenizer, not the preset: codebook size after remapping and the token map's sides.
    num_codes: int = field(default=256, metadata=between(2))
    height: int = field(default=8, metadata=between(1))
    width: int = field(default=8, metadata=between(1))


def load_transformer_preset(name: str, num_codes: int, height: int, width: int) -> TransformerConfig:
    """A ``transformer-<name>.json`` preset (or a JSON path) for a tokenizer's codebook and token map."""
    config, where = read_preset("transformer", name, TransformerConfig, num_codes=num_codes, height=height,
                                width=width)
    if config.n_embd % config.n_head:
        raise ConfigError(f"{where}: n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    return config


@dataclass
class DiscreteConfig:
    """Everything the discrete model's constructor needs."""

    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    transition: TransitionConfig = field(default_factory=TransitionConfig)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "DiscreteConfig":
        try:
            return cls(transformer=TransformerConfig(**raw["transformer"]),
                       conditioning=ConditioningConfig.from_dict(raw["conditioning"]),
                       transition=TransitionConfig(**raw["transition"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"model config: {err!s}; expected the keys of DiscreteConfig "
                              "(transformer, conditioning, transition)") from None


@dataclass
class DiscreteSampler:
    """How the discrete backbone samples at inference: ``steps`` of its N-step chain (fewer: strided) and
    truncation to the top-r mass of the conditional prediction (1: off)."""

    steps: int = field(default=25, metadata=between(1, 10000))
    truncation: float = field(default=0.9, metadata=between(0, 1, low_open=True))

    def generator_options(self) -> dict:
        return {"truncation": self.truncation}


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
    # VQ-Diffusion: 5e-4 of a summed loss; here the terms are means per token, and 5e-4 scored worse on val on
    # every metric (docs/defaults.md)
    aux_weight: float = field(default=1.0, metadata=between(0))
    timestep_sampling: TimestepSampling = TimestepSampling.importance  # VQ-Diffusion's (docs/defaults.md)
    seed: int = 0
    checkpoint_every: int = field(default=250, metadata=between(1))
    keep_checkpoints: int = field(default=2, metadata=between(1))
    keep_runs: int = field(default=2, metadata=between(1))  # resumable state folders kept (as train_continuous)
    log_every: int = field(default=10, metadata=between(1))
    sample_every: int = field(default=0, metadata=between(0))  # 0: only at the end
    num_workers: int = field(default=0, metadata=between(0, 64))
    nproc_per_node: int = field(default=1, metadata=between(1, 64))
    sampling: DiscreteSamplingConfig = field(default_factory=DiscreteSamplingConfig)
