"""Editing an image from text alone: the user's image in the image slot, f_txt(text) (and its retrieved
neighbours) in place of f_img(I * M); no mask - the model finds the region itself.

Any image size goes in: it is resized to the model's square resolution, edited there, and the edit's
*change* (edited - resized input) is resized back and added to the original, so pixels the model left
alone keep the input's full-resolution detail and the output has the input's size.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from knn_diffusion.manipulation.config import EditSampler
from knn_diffusion.manipulation.model import ManipulationDenoiser, WithSource
from knn_diffusion.manipulation.training import unit_range
from knn_diffusion.models.continuous.sampler import sample
from knn_diffusion.retrieval.inference import NeighbourSearch


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


def text_conditions(text_embeddings: np.ndarray, knn: NeighbourSearch | None, k: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cond (N, 1+k, d), neighbour ids (N, k), scores (N, k)): f_txt(text) in the place of f_img(I * M),
    followed by its k nearest images in the index, as in text-to-image generation."""
    queries = np.asarray(text_embeddings, dtype=np.float32)  # (N, d)
    if k == 0:
        return queries[:, None], np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
    if knn is None:
        raise ValueError(f"k={k} neighbours need an index to retrieve them from")
    ids, scores, neighbours = knn(queries, k)  # (N, k), (N, k), (N, k, d)
    cond = np.concatenate([queries[:, None], np.asarray(neighbours, dtype=np.float32)], axis=1)
    return cond, np.asarray(ids), np.asarray(scores)


def edit_images(model: ManipulationDenoiser, sources: np.ndarray, cond: np.ndarray, sampler: EditSampler,
                seeds: Sequence[int] | None = None, batch_size: int = 32) -> np.ndarray:
    """uint8 (N, side, side, 3) sources edited towards their conditions (N, 1+k, d); edit i from noise
    seeded ``seeds[i]`` (default ``sampler.seed + i``)."""
    seeds = list(seeds) if seeds is not None else [sampler.seed + i for i in range(len(cond))]
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(cond), batch_size):
        stop = min(start + batch_size, len(cond))
        bound = WithSource(model, unit_range(sources[start:stop]).to(device))
        parts.append(sample(bound, cond[start:stop], guidance=sampler.guidance, scheduler=sampler.scheduler,
                            steps=sampler.steps, seed=seeds[start:stop]))
    return np.concatenate(parts)
