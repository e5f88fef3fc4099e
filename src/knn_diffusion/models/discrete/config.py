"""Constructor configs of the discrete backbone (stored in every checkpoint; no torch imports)."""

from __future__ import annotations

from dataclasses import dataclass, field

from knn_diffusion.config_fields import ConfigError, between
from knn_diffusion.models.config import ConditioningConfig, config_to_dict, read_preset


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
