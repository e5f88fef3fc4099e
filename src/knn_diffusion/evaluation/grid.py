"""What the evaluation scores: held-out prompts, inference-time grid points, the retrieval baseline.

A grid point varies only what inference can change (k, index fraction, guidance, retrieval index,
per-query score quantile), so one trained model covers the whole grid. k=0 conditions on the text
embedding alone (the paper's "no kNN at inference"); it retrieves nothing, so it is one point per
guidance, whatever the index settings.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from knn_diffusion.data.store import ImageStore
from knn_diffusion.evaluation.config import EvaluateGridConfig
from knn_diffusion.generation import _slug
from knn_diffusion.images import image_grid, save_png
from knn_diffusion.io import write_json
from knn_diffusion.models.config import ConditioningConfig, ConditioningVariant

NOT_APPLICABLE = "-"  # index settings of a point that retrieves nothing
BASELINE = "retrieval_baseline"


@dataclass(frozen=True)
class GridPoint:
    k: int
    guidance: float
    index_fraction: float | None = None  # None when k=0
    index: str | None = None
    score_quantile: int | None = None  # None when k=0; 0 = all neighbours

    @property
    def name(self) -> str:
        if self.k == 0:
            return f"k0-g{self.guidance:g}"
        quantile = f"-q{self.score_quantile}" if self.score_quantile else ""
        return f"k{self.k}-frac{self.index_fraction:g}-g{self.guidance:g}-{self.index}{quantile}"

    def params(self) -> dict[str, str | int | float]:
        """MLflow params of the point (strings '-' where a setting does not apply)."""
        return {key: NOT_APPLICABLE if value is None else value for key, value in asdict(self).items()}


def grid_points(grid: EvaluateGridConfig, guidance_scales: list[float], trained: ConditioningConfig) -> list[GridPoint]:
    """The product of the grid's axes and the backbone's guidance scales, without duplicates: k=0 once per
    guidance; a variant without neighbours (``no_knn``) only at k=0; a variant whose layers fix K
    (``concat_linear``) only at its trained k."""
    variant = ConditioningVariant(trained.variant)
    points: list[GridPoint] = []
    for k, fraction, guidance, index, quantile in itertools.product(grid.k, grid.index_fraction, guidance_scales,
                                                                    grid.index, grid.score_quantile):
        k = variant.neighbours(k)
        if variant.fixed_k and k != trained.k:
            continue
        point = GridPoint(0, guidance) if k == 0 else GridPoint(k, guidance, fraction, index, quantile)
        if point not in points:
            points.append(point)
    return points


def split_prompts(store: ImageStore, split: str, count: int, seed: int, template: str) -> tuple[list[str], np.ndarray]:
    """``count`` captioned images of ``split`` drawn with ``seed``: (prompts from ``template``, their rows)."""
    captions = store.read_captions().loc[store.rows(split)].dropna()
    captions = captions[captions.str.strip() != ""]
    if captions.empty:
        raise ValueError(f"{store.root}: no {split}-split image has a caption; set evaluate.prompts_file")
    rows = draw(captions.index.to_numpy(np.int64), count, seed)
    return [template.format(name=captions[row]) for row in rows], rows


def draw(rows: np.ndarray, count: int, seed: int) -> np.ndarray:
    """min(count, len(rows)) of ``rows`` (all of them when ``count`` is 0), sorted, chosen by ``seed`` (the
    same rows on every machine)."""
    if count == 0:
        return np.sort(np.asarray(rows))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=min(count, len(rows)), replace=False))


def retrieval_baseline(knn, index_sidecar: dict, images: Callable[[np.ndarray], np.ndarray], prompts: list[str],
                       queries: np.ndarray, out_dir: str | os.PathLike) -> np.ndarray:
    """The first retrieved image per prompt (the paper's "Nearest Neighbor" column of Fig. 2), written
    like ``generate``'s output (PNG + sidecar per prompt, ``grid.png``); returns the images (N, H, W, 3)."""
    ids, scores, _ = knn(queries, 1)  # (N, 1)
    picked = images(ids[:, 0])  # through the retrieval backend
    out_dir = Path(out_dir)
    for i, prompt in enumerate(prompts):
        stem = f"{i:04d}-{_slug(prompt)}"
        save_png(out_dir / f"{stem}.png", picked[i])
        write_json(out_dir / f"{stem}.json", {
            "prompt": prompt, "seed": None, "k": 1, "neighbour_ids": [int(ids[i, 0])],
            "neighbour_scores": [float(scores[i, 0])], "backbone": "retrieval", "variant": None, "model_run_id": "",
            "index_fingerprint": index_sidecar.get("sha256", ""),
            "index_fraction": index_sidecar.get("index_fraction", 1.0),
            "image": f"{stem}.png"})
    save_png(out_dir / "grid.png", image_grid(picked))
    return picked


def settings_grid(columns: dict[str, np.ndarray], rows: int) -> np.ndarray:
    """One image: the first ``rows`` prompts down, one column per setting (same prompt order in each)."""
    names = list(columns)
    stacked = np.stack([columns[name][:rows] for name in names], axis=1)  # (rows, settings, H, W, 3)
    return image_grid(stacked.reshape(-1, *stacked.shape[2:]), columns=len(names))
