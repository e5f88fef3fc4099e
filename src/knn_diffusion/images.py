"""Small image helpers shared by ingest (sample grids), training (eval grids) and sampling (PNGs).

Kept free of torch/diffusers so light stages can use them without the heavy imports.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from knn_diffusion.io import atomic_path


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """(B, H, W, 3) uint8 -> one (rows*(H+pad)+pad, columns*(W+pad)+pad, 3) uint8 grid."""
    count, height, width, _ = images.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), fill, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        grid[top:top + height, left:left + width] = image
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
