"""Constructor configs of the generators and their size presets.

A trained model's checkpoint stores a :class:`DenoiserConfig`, so loading rebuilds the same network.
Architecture presets are small JSON files in ``knn_diffusion/model_configs/`` (``<family>-<name>.json``:
``unet-`` for the continuous backbone, ``transformer-`` for the discrete one; open_clip style);
:func:`list_presets` lists a family and :func:`read_preset` reads one. Add a file to add a size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from knn_diffusion.config_fields import ConfigError, between


class ConditioningVariant(str, Enum):
    """How the (1+K, d) query + neighbour embeddings become cross-attention tokens (paper 3, 6.5)."""

    tokens = "tokens"                                  # the paper's choice: K+1 projected tokens
    self_attention = "self_attention"                  # 6.5 (i): contextualised by self-attention
    cross_attention_pooled = "cross_attention_pooled"  # 6.5 (ii): one token, query attends to the kNN
    concat_linear = "concat_linear"                    # 6.5 (iii): query token + linear map of the kNN
    no_knn = "no_knn"                                  # baseline: the image/text embedding only


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

    scheduler: SchedulerName = SchedulerName.dpm_solver_pp_sde  # cleanest on small models (see sampling.py)
    steps: int = field(default=25, metadata=between(1, 1000))

    def generator_options(self) -> dict:
        """Keyword arguments of ``generation.load_generator`` for this backbone."""
        return {"scheduler": self.scheduler}


@dataclass
class DiscreteSampler:
    """How the discrete backbone samples at inference: ``steps`` of its N-step chain (fewer: strided) and
    truncation to the top-r mass of the conditional prediction (1: off)."""

    steps: int = field(default=25, metadata=between(1, 10000))
    truncation: float = field(default=0.9, metadata=between(0, 1, low_open=True))

    def generator_options(self) -> dict:
        return {"truncation": self.truncation}


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
class ConditioningConfig:
    variant: ConditioningVariant = ConditioningVariant.tokens
    embed_dim: int = field(default=512, metadata=between(1, 8192))  # d of the CLIP space
    k: int = field(default=10, metadata=between(0, 256))  # neighbours seen in training
    heads: int = field(default=4, metadata=between(1, 64))  # self_attention / cross_attention_pooled

    @classmethod
    def from_dict(cls, raw: dict) -> "ConditioningConfig":
        return cls(**{**raw, "variant": ConditioningVariant(raw["variant"])})


def config_to_dict(config) -> dict:
    """A (nested) constructor-config dataclass -> JSON-able dict, enums as their values."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=lambda e: e.value))


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


def _preset_files(family: str) -> dict[str, Traversable]:
    folder = resources.files("knn_diffusion") / "model_configs"
    prefix = f"{family}-"
    return {f.name[len(prefix):-len(".json")]: f for f in folder.iterdir()
            if f.name.startswith(prefix) and f.name.endswith(".json")}


def list_presets(family: str = "unet") -> list[str]:
    """Names of one architecture family's size presets (``tiny``, ``35M``, ``100M``, ``400M``, ...)."""
    return sorted(_preset_files(family), key=lambda name: (name != "tiny", len(name), name))


def read_preset(family: str, name: str, schema: type, **fixed) -> tuple[object, str]:
    """(``schema(**preset, **fixed)``, where it came from) for ``model_configs/<family>-<name>.json`` or a path.

    ``fixed`` are the fields that come from the data rather than the preset (e.g. the resolution).
    """
    files = _preset_files(family)
    if name in files:
        source, where = files[name], f"model_configs/{family}-{name}.json"
    elif name.endswith(".json") and Path(name).is_file():
        source, where = Path(name), name
    else:
        raise ConfigError(f"model preset {name!r}: expected one of {list_presets(family)} or a path to a .json file")
    try:
        raw = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err})") from None
    known = {f.name for f in dataclasses.fields(schema)} - set(fixed)
    unknown = sorted(set(raw) - known - {"comment"})
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; expected {sorted(known)}")
    raw.pop("comment", None)
    return schema(**raw, **fixed), where


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
