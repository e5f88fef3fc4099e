"""Small real inputs for the continuous-model tests: coloured-square images, unit embeddings, a micro U-Net."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from knn_diffusion.models.config import ConditioningConfig, ConditioningVariant
from knn_diffusion.models.continuous.config import DenoiserConfig, UNetConfig

# Two levels, attention at the lower one: the smallest U-Net that still cross-attends (~0.1M params).
MICRO_UNET = {"block_out_channels": [32, 32], "attention": [False, True], "layers_per_block": 1,
              "head_channels": 16, "cross_attention_dim": 32, "norm_num_groups": 8}


class ArrayEmbeddings:
    """The EmbeddingStore interface over an in-memory array."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def get(self, positions) -> np.ndarray:
        return self.array[np.asarray(positions, dtype=np.int64)]


def write_micro_preset(folder: Path) -> str:
    path = folder / "unet-micro.json"
    path.write_text(json.dumps(MICRO_UNET))
    return str(path)


def micro_config(variant: ConditioningVariant = ConditioningVariant.tokens, embed_dim: int = 16, k: int = 3,
                 resolution: int = 8) -> DenoiserConfig:
    return DenoiserConfig(unet=UNetConfig(**MICRO_UNET, resolution=resolution),
                          conditioning=ConditioningConfig(variant=variant, embed_dim=embed_dim, k=k))


def square_images(count: int, side: int, seed: int = 0) -> np.ndarray:
    """uint8 (count, side, side, 3): one randomly placed, randomly coloured square on white each."""
    rng = np.random.default_rng(seed)
    images = np.full((count, side, side, 3), 255, np.uint8)
    half = side // 2
    for image in images:
        top, left = rng.integers(0, side - half + 1, 2)
        image[top:top + half, left:left + half] = rng.integers(0, 256, 3)
    return images


def unit_embeddings(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def ring_neighbours(count: int, k: int) -> np.ndarray:
    """(count, k) int64: image i's neighbours are i+1 .. i+k (mod count), self excluded."""
    return (np.arange(count)[:, None] + np.arange(1, k + 1)[None]) % count
