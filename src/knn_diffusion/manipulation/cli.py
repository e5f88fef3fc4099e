"""``knn-diffusion edit INPUT "text" [...] --out DIR``: mask-free, text-guided editing of one image.

Every input is checked before the model, the encoder or torch load (and before anything is written):
an empty prompt, a missing model, a file that is not an image and an image smaller than the model's
resolution each end as one ``error:`` line (``cli.main``) with exit code 2. ``--out`` is written
atomically: one ``<i>-<slug>.png`` (the input's size) + ``.json`` sidecar per prompt and ``grid.png``
(input | edits).
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from knn_diffusion.config import ConfigError, load_params
from knn_diffusion.config_fields import check_field, check_output_folder


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
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: edit.guidance)")
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


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "edit"


def edit_command(args: argparse.Namespace) -> None:
    """Check everything, then edit the input once per prompt and write the results atomically."""
    from knn_diffusion.stages import paths

    check_edit_arguments(args)
    params = load_params(args.params, args.set or [])
    checkpoint = Path(args.checkpoint or paths.MANIPULATION_MODEL)
    image = read_input_image(args.input, model_resolution(checkpoint))

    import dataclasses

    from knn_diffusion.encoders.factory import load_encoder
    from knn_diffusion.images import image_grid, save_png
    from knn_diffusion.io import atomic_dir, content_sha256, write_json
    from knn_diffusion.manipulation.editing import edit_images, text_conditions, to_input_size, to_model_size
    from knn_diffusion.manipulation.model import load_manipulation_model, trained_k
    from knn_diffusion.retrieval.backends import open_backend
    from knn_diffusion.tracking import model_run_id

    model, config = load_manipulation_model(checkpoint)
    encoder = load_encoder(params.encoder, paths.ENCODER)
    k = trained_k(model) if args.k is None else args.k
    knn, sidecar = (None, {})
    if k > 0:
        backend = open_backend(params.retrieval, paths.retrieval_roots(), encoder.fingerprint, encoder.dim)
        neighbours = backend.open(args.index or params.data.generator_dataset)
        knn, sidecar = neighbours.knn, neighbours.sidecar
    sampler = dataclasses.replace(params.edit, **{name: getattr(args, name) for name in ("guidance", "steps", "seed")
                                                  if getattr(args, name) is not None})
    source = to_model_size(image, model.config.unet.resolution)
    cond, ids, scores = text_conditions(encoder.encode_texts(args.prompts), knn, k)
    edits = edit_images(model, np.repeat(source[None], len(args.prompts), axis=0), cond, sampler)
    outputs = [to_input_size(image, source, edited) for edited in edits]
    input_sha256 = hashlib.sha256(Path(args.input).read_bytes()).hexdigest()
    model_sha256 = content_sha256(checkpoint)  # the folder names no run: its training run is found by this hash
    run_id = model_run_id(checkpoint, params.tracking.experiment, params.tracking.tracking_uri)
    with atomic_dir(Path(args.out).resolve()) as out:  # a failed run leaves --out as it was
        for i, (prompt, output) in enumerate(zip(args.prompts, outputs)):
            stem = f"{i:04d}-{_slug(prompt)}"
            save_png(out / f"{stem}.png", output)
            write_json(out / f"{stem}.json", {
                "prompt": prompt, "input": str(args.input), "input_sha256": input_sha256,
                "input_size": [image.shape[1], image.shape[0]], "model_resolution": model.config.unet.resolution,
                "seed": sampler.seed + i, "k": k, "neighbour_ids": ids[i].tolist(),
                "neighbour_scores": [float(s) for s in scores[i]], "guidance": sampler.guidance,
                "steps": sampler.steps, "scheduler": sampler.scheduler.value, "checkpoint": str(checkpoint),
                "model_run_id": run_id, "model_sha256": model_sha256,
                "text_to_image_sha256": config.get("text_to_image_sha256", ""),
                "encoder_fingerprint": encoder.fingerprint, "index": sidecar.get("dataset", ""),
                "index_fingerprint": sidecar.get("sha256", ""), "index_fraction": sidecar.get("index_fraction", 1.0),
                "subset_seed": sidecar.get("subset_seed", 0), "score_filter": sidecar.get("score_filter", [0.0, 1.0]),
                "image": f"{stem}.png"})
            print(f"{args.out}/{stem}.png  {prompt!r}  seed {sampler.seed + i}")
        save_png(out / "grid.png", image_grid(np.stack([image, *outputs]), columns=1 + len(outputs)))
    print(f"{args.out}/grid.png  (input | edits)")
