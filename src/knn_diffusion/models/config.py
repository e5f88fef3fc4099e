"""What both backbones share in their constructor configs: the conditioning, and the size presets.

A trained model's checkpoint stores its backbone's constructor config (``DenoiserConfig``,
``DiscreteConfig``, each beside its backbone), so loading rebuilds the same network.
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
    """How the (1+K, d) query + neighbour embeddings become cross-attention tokens (paper 3, 6.5).

    Each variant declares what it needs; its layers are the class registered for it in
    ``models/conditioning.py``. ``uses_knn=False``: it sees the query alone, so it is trained and
    sampled with k=0 whatever the params say. ``fixed_k``: its layers are sized by the trained k, so
    inference must retrieve exactly that many neighbours.
    """

    def __new__(cls, value: str, uses_knn: bool = True, fixed_k: bool = False) -> "ConditioningVariant":
        member = str.__new__(cls, value)
        member._value_ = value
        member.uses_knn, member.fixed_k = uses_knn, fixed_k
        return member

    tokens = "tokens"                                        # the paper's choice: K+1 projected tokens
    self_attention = "self_attention"                        # 6.5 (i): contextualised by self-attention
    cross_attention_pooled = "cross_attention_pooled"        # 6.5 (ii): one token, query attends to the kNN
    concat_linear = "concat_linear", True, True              # 6.5 (iii): query token + linear map of the kNN
    no_knn = "no_knn", False                                 # baseline: the image/text embedding only

    def neighbours(self, k: int) -> int:
        """How many neighbours a model of this variant is conditioned on when k are asked for."""
        return k if self.uses_knn else 0


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
