"""The evaluation loop: one trained generator over the grid points, each generated and scored, and the
retrieval baseline scored the same way; then the outputs every evaluation writes (``points.csv``, the
numbers per point, the prompts x settings grid).

Library code: the caller hands in the neighbour search per point and, through ``on_point``, receives
each point's settings and scores (the evaluate stage logs them as MLflow child runs).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from knn_diffusion.evaluation.grid import BASELINE, GridPoint, retrieval_baseline
from knn_diffusion.evaluation.metrics import ImageScorer, metric_columns
from knn_diffusion.generation import Generator, TextEncoder, generate
from knn_diffusion.retrieval.backends import Neighbours

# (point name, its settings, its scores and timings, kind: "grid_point" or BASELINE)
PointFn = Callable[[str, dict, dict, str], None]
SearchFn = Callable[[GridPoint], Neighbours]
# (point, its neighbours, generate's records, its images) -> scores that only some points have (e.g. Fig. 8's)
ExtraFn = Callable[[GridPoint, Neighbours, list[dict], np.ndarray], dict]


def read_images(folder: Path, records: list[dict]) -> np.ndarray:
    """The PNGs ``generate`` wrote, in record order: uint8 (N, H, W, 3) - exactly what is scored."""
    return np.stack([np.asarray(Image.open(folder / r["image"]).convert("RGB")) for r in records])


def score_grid(generator: Generator, points: list[GridPoint], search: SearchFn, *, prompts: list[str],
               encoder: TextEncoder, scorer: ImageScorer, out: Path, steps: int, seed: int, batch_size: int,
               extra_scores: ExtraFn | None = None, on_point: PointFn | None = None
               ) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Generate every point into ``out/<point>/`` and score it: (one row per point, its images by name)."""
    rows, images_by_point = [], {}
    for point in tqdm(points, desc="evaluate", unit="point"):
        neighbours = search(point)
        start = time.perf_counter()
        records = generate(generator, out_dir=out / point.name, knn=neighbours.knn, prompts=prompts, encoder=encoder,
                           k=point.k, guidance=point.guidance, steps=steps, seed=seed, batch_size=batch_size,
                           index_sidecar=neighbours.sidecar)
        images = read_images(out / point.name, records)
        generated = time.perf_counter()
        scores = scorer.score(images, prompts)
        timing = {"generate_s": generated - start, "score_s": time.perf_counter() - generated}
        if extra_scores is not None:
            scores.update(extra_scores(point, neighbours, records, images))
        if on_point is not None:
            on_point(point.name, point.params(),
                     {**scores, **timing, "images_per_s": len(images) / (time.perf_counter() - start)}, "grid_point")
        rows.append({"point": point.name, **point.params(), **scores, **timing})
        images_by_point[point.name] = images
    return rows, images_by_point


def score_baseline(neighbours: Neighbours, index: str, index_fraction: float, *, prompts: list[str],
                   encoder: TextEncoder, scorer: ImageScorer, out: Path,
                   on_point: PointFn | None = None) -> tuple[dict, np.ndarray]:
    """The first retrieved image per prompt, written to ``out/retrieval_baseline/`` and scored: (row, images)."""
    picked = retrieval_baseline(neighbours.knn, neighbours.sidecar, neighbours.images, prompts,
                                encoder.encode_texts(prompts), out / BASELINE)
    scores = scorer.score(picked, prompts)
    settings = {"k": 1, "guidance": "-", "index_fraction": index_fraction, "index": index}
    if on_point is not None:
        on_point(BASELINE, settings, scores, BASELINE)
    return {"point": BASELINE, **settings, **scores}, picked


def write_table(path: Path, rows: list[dict]) -> None:
    """One line per grid point, every metric a column; timings stay out (outputs are byte-reproducible,
    timings are metrics). A row without a metric's value is an error, never a blank."""
    columns = metric_columns()
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["point", "k", "index_fraction", "guidance", "index", *columns],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, **{m: f"{row[m]:.6f}" for m in columns}} for row in rows)


def metrics_summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{point: {metric: value}} for every metric of the table (the stage's metrics file)."""
    return {row["point"]: {m: round(float(row[m]), 6) for m in metric_columns()} for row in rows}
