"""Editing an image from text alone: the user's image in the image slot, f_txt(text) (and its retrieved
neighbours) in place of f_img(I * M); no mask - the model finds the region itself.

Any image size goes in: it is resized to the model's square resolution, edited there, and the edit's
*change* (edited - resized input) is resized back and added to the original, so pixels the model left
alone keep the input's full-resolution detail and the output has the input's size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from knn_diffusion.manipulation.config import EditSampler
from knn_diffusion.manipulation.model import ManipulationDenoiser, WithSource
from knn_diffusion.manipulation.training import unit_range
from knn_diffusion.retrieval.inference import NeighbourSearch
from knn_diffusion.sampling import sample


def read_input_image(path: str | os.PathLike, min_side: int) -> np.ndarray:
    """uint8 (H, W, 3) of an image file; a file that is not an image, or one smaller than ``min_side``
    on a side, is refused with a ValueError naming it."""
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
        raise ValueError(f"{path}: image is {width}x{height} px, too small: the model edits at {min_side} px, "
                         f"give an image at least {min_side} px on each side")
    return pixels


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def to_model_size(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (side, side, 3)."""
    interpolation = cv2.INTER_AREA if min(image.shape[:2]) >= side else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (side, side), interpolation=interpolation)


def to_input_size(original: np.ndarray, source: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """original + resize(edited - source) at the original's size, clipped: uint8 (H, W, 3)."""
    height, width = original.shape[:2]
    change = edited.astype(np.float32) - source.astype(np.float32)  # (side, side, 3)
    change = cv2.resize(change, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(original.astype(np.float32) + change), 0, 255).astype(np.uint8)


@dataclass
class Edits:
    images: np.ndarray             # uint8 (N, side, side, 3), the model's outputs
    neighbour_ids: np.ndarray      # (N, k)
    neighbour_scores: np.ndarray   # (N, k)


def edit_images(model: ManipulationDenoiser, sources: np.ndarray, text_embeddings: np.ndarray,
                knn: NeighbourSearch | None, k: int, sampler: EditSampler,
                seeds: Sequence[int] | None = None, batch_size: int = 32) -> Edits:
    """Edit each uint8 (side, side, 3) source towards its text embedding (N, d); edit i from noise seeded
    ``seeds[i]`` (default ``sampler.seed + i``)."""
    queries = np.asarray(text_embeddings, dtype=np.float32)  # (N, d)
    count = len(queries)
    seeds = list(seeds) if seeds is not None else [sampler.seed + i for i in range(count)]
    if k > 0:
        if knn is None:
            raise ValueError(f"k={k} neighbours need an index to retrieve them from")
        ids, scores, neighbours = knn(queries, k)  # (N, k), (N, k), (N, k, d)
        cond = np.concatenate([queries[:, None], np.asarray(neighbours, dtype=np.float32)], axis=1)
    else:
        ids, scores, cond = np.zeros((count, 0), np.int64), np.zeros((count, 0), np.float32), queries[:, None]
    device = next(model.parameters()).device
    parts = []
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        bound = WithSource(model, unit_range(sources[start:stop]).to(device))
        parts.append(sample(bound, cond[start:stop], guidance=sampler.guidance, scheduler=sampler.scheduler,
                            steps=sampler.steps, seed=seeds[start:stop]))
    return Edits(np.concatenate(parts), np.asarray(ids), np.asarray(scores))
