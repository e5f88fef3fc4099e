"""The arguments and input checks of ``knn-diffusion edit INPUT "text" [...] --out DIR`` (the command itself
is ``cli.py``'s ``_edit_command``): mask-free, text-guided editing of one image.

Every input is checked before the model, the encoder or torch load (and before anything is written):
an empty prompt, a missing model, a file that is not an image and an image smaller than the model's
resolution each end as one ``error:`` line (``cli.main``) with exit code 2. ``--out`` is written
atomically: one ``<i>-<slug>.png`` (the input's size) + ``.json`` sidecar per prompt and ``grid.png``
(input | edits).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from knn_diffusion.config_fields import ConfigError, check_field, check_output_folder


def read_input_image(path: str | Path, min_side: int) -> np.ndarray:
    """uint8 (H, W, 3) of an image file; refuses (ValueError naming the file) a file that is not an image
    and an image below ``min_side`` px on a side."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input image not found")
    try:
        with Image.open(path) as image:
            image.load()
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: not a readable image file ({' '.join(str(err).split())[:120]})") from None
    height, width = pixels.shape[:2]
    if min(height, width) < min_side:
        raise ValueError(f"{path}: image is {width}x{height} px, too small: the model edits at {min_side} px, so "
                         f"give an image at least {min_side} px on each side")
    return pixels


def model_resolution(checkpoint: Path) -> int:
    """The square side the manipulation model at ``checkpoint`` works at (from its config.json only)."""
    from knn_diffusion.io import read_json

    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: no manipulation model there (run `dvc repro train_manipulation`, "
                                "or pass --checkpoint)")
    config = read_json(checkpoint / "config.json")
    if config.get("backbone") != "manipulation":
        raise ValueError(f"{checkpoint}: a {config.get('backbone', 'continuous')} checkpoint, not a manipulation "
                         "model (train_manipulation's models/manipulation)")
    return int(config["model"]["unet"]["resolution"])


def add_edit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("input", help="the image to edit (PNG, JPEG, WebP, ...; any size)")
    parser.add_argument("prompts", nargs="+", help="what to change, e.g. 'wears a hat'; one edit per prompt")
    parser.add_argument("--out", required=True, help="output directory (replaced as a whole on success)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance (default: edit.guidance)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: edit.steps)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first edit; edit i uses seed+i")
    parser.add_argument("--k", type=int, default=None, help="neighbours of the text to retrieve (default: as trained)")
    parser.add_argument("--index", default=None, help="index to retrieve from (default: the generator dataset's)")
    parser.add_argument("--checkpoint", default=None, help="manipulation model folder (default: models/manipulation)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="params override (repeatable)")
    return parser


def check_edit_arguments(args: argparse.Namespace) -> None:
    from knn_diffusion.manipulation.config import EditSampler, PairsConfig

    for number, prompt in enumerate(args.prompts, 1):
        if not prompt.strip():
            raise ConfigError(f"prompt {number} is empty: say what to change, e.g. 'wears a hat'")
    for option, owner, name in (("--steps", EditSampler, "steps"), ("--guidance", EditSampler, "guidance"),
                                ("--k", PairsConfig, "k")):
        if getattr(args, name) is not None:
            check_field(owner, name, getattr(args, name), option)
    check_output_folder(args.out, "edit")


def output_stem(number: int, prompt: str) -> str:
    """``<number>-<slug of the prompt>``: the file name (without suffix) of one edit."""
    return f"{number:04d}-" + (re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "edit")
