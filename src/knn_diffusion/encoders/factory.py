"""Pick and load the encoder named in params: an open_clip model, or the offline aligned one."""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch

from knn_diffusion.encoders.aligned import load_aligned
from knn_diffusion.encoders.config import EncoderConfig, EncoderKind
from knn_diffusion.encoders.encoder import Encoder

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
LOCAL_DIR_PREFIX = "local-dir:"


def _architecture_name(model_name: str) -> str:
    """A built-in name passes through; a JSON architecture file is registered under its stem."""
    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise FileNotFoundError(f"encoder.model_name: architecture file {path} not found")
        open_clip.add_model_config(path)
        return path.stem
    if not model_name.startswith(LOCAL_DIR_PREFIX) and model_name not in open_clip.list_models():
        raise ValueError(f"encoder.model_name {model_name!r}: not an open_clip architecture; expected one "
                         "of open_clip.list_models(), a .json architecture file, or 'local-dir:<folder>'")
    return model_name


def _checked_pretrained(name: str, pretrained: str) -> str | None:
    """A known tag, or a local weights file of a safe format; anything else is refused up front."""
    if not pretrained:
        return None
    if name.startswith(LOCAL_DIR_PREFIX):
        raise ValueError(f"encoder.pretrained {pretrained!r}: must be empty with {name!r} "
                         "(the folder holds the weights)")
    if open_clip.get_pretrained_cfg(name, pretrained):
        return pretrained
    path = Path(pretrained)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"encoder.pretrained {pretrained!r}: not a pretrained tag of {name} "
                         f"{open_clip.list_pretrained_tags_by_model(name)} nor a weights file {WEIGHT_SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"encoder.pretrained: weights file {path} not found")
    return str(path)


def load_open_clip(model_name: str, pretrained: str = "", device: str | torch.device = "cpu") -> Encoder:
    """open_clip by architecture + pretrained tag or local checkpoint.

    A tag downloads its weights on first use (network needed once; cached under
    ``~/.cache/huggingface`` or ``$HF_HOME``). Local ``.pt``/``.pth``/``.bin`` files load with
    ``torch.load(weights_only=True)`` and ``.safetensors`` with safetensors: no arbitrary unpickling.
    """
    name = _architecture_name(model_name)
    weights = _checked_pretrained(name, pretrained)
    model = open_clip.create_model(name, pretrained=weights, device=device, weights_only=True)
    description = {"kind": EncoderKind.open_clip.value, "model_name": model_name,
                   "pretrained": Path(weights).name if weights and os.path.isfile(weights) else (weights or "")}
    return Encoder(model, open_clip.get_tokenizer(name), description)


def load_encoder(cfg: EncoderConfig, aligned_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu") -> Encoder:
    """The encoder the params select; ``aligned_dir`` is the encoder stage's output folder."""
    if cfg.kind == EncoderKind.aligned:
        if aligned_dir is None:
            raise ValueError("encoder.kind=aligned needs the trained model folder (the encoder stage's output)")
        return load_aligned(aligned_dir, device=device)
    return load_open_clip(cfg.model_name, cfg.pretrained, device=device)
