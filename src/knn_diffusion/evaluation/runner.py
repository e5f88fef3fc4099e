"""The evaluation loop: one trained generator over the grid points, each generated and scored, and the
retrieval baseline scored the same way; then the outputs every evaluation writes (``points.csv``, the
numbers per point, the prompts x settings grid).

Every point is generated for P prompts x S seeds (the prompts repeated S times, so image ``s * P + p``
gets noise seed ``seed + s * P + p``: the same in every point); its per-image values are saved under
``scores/<point>/`` (:class:`~knn_diffusion.evaluation.intervals.PointScores`) and every metric gets a
bootstrap 95% CI over prompts.

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

from knn_diffusion.evaluation.config import BootstrapConfig
from knn_diffusion.evaluation.grid import BASELINE, GridPoint, retrieval_baseline
from knn_diffusion.evaluation.intervals import (
    PointScores,
    Reference,
    interval_columns,
    paired_differences,
    point_intervals,
)
from knn_diffusion.evaluation.metrics import ImageScorer, metric_columns
from knn_diffusion.generation import Generator, TextEncoder, generate
from knn_diffusion.retrieval.backends import Neighbours

# (point name, its settings, its scores and timings, kind: "grid_point" or BASELINE)
PointFn = Callable[[str, dict, dict, str], None]
SearchFn = Callable[[GridPoint], Neighbours]
# (point, its neighbours, generate's records, its images) -> scores that only some points have (e.g. Fig. 8's)
ExtraFn = Callable[[GridPoint, Neighbours, list[dict], np.ndarray], dict]
SCORES = "scores"  # out/scores/<point>/: the per-image values of each point (PointScores)


def score_with_intervals(scorer: ImageScorer, images: np.ndarray, prompts: list[str], seeds: int,
                         bootstrap: BootstrapConfig, folder: Path) -> tuple[dict[str, float], PointScores]:
    """Every metric of S x P images (seed-major) with its 95% CI; the per-image values saved in ``folder``."""
    scored = scorer.scored_set(images, prompts)
    values = scorer.values(scored)
    per_image = scorer.per_image(scored, seeds)
    per_image.save(folder)
    values.update(point_intervals(per_image, scorer.reference_statistics, values, resamples=bootstrap.resamples,
                                  set_resamples=bootstrap.set_resamples, seed=bootstrap.seed))
    return values, per_image


def read_images(folder: Path, records: list[dict]) -> np.ndarray:
    """The PNGs ``generate`` wrote, in record order: uint8 (N, H, W, 3) - exactly what is scored."""
    return np.stack([np.asarray(Image.open(folder / r["image"]).convert("RGB")) for r in records])


def score_grid(generator: Generator, points: list[GridPoint], search: SearchFn, *, prompts: list[str], seeds: int,
               encoder: TextEncoder, scorer: ImageScorer, out: Path, steps: int, seed: int, batch_size: int,
               bootstrap: BootstrapConfig, extra_scores: ExtraFn | None = None, on_point: PointFn | None = None
               ) -> tuple[list[dict], dict[str, np.ndarray], dict[str, PointScores]]:
    """Generate every point into ``out/<point>/`` and score it: (one row per point, its images by name,
    its per-image values by name)."""
    rows, images_by_point, per_image = [], {}, {}
    repeated = list(prompts) * seeds
    for point in tqdm(points, desc="evaluate", unit="point"):
        neighbours = search(point)
        start = time.perf_counter()
        records = generate(generator, out_dir=out / point.name, knn=neighbours.knn, prompts=repeated, encoder=encoder,
                           k=point.k, guidance=point.guidance, steps=steps, seed=seed, batch_size=batch_size,
                           index_sidecar=neighbours.sidecar)
        images = read_images(out / point.name, records)
        generated = time.perf_counter()
        scores, per_image[point.name] = score_with_intervals(scorer, images, repeated, seeds, bootstrap,
                                                             out / SCORES / point.name)
        timing = {"generate_s": generated - start, "score_s": time.perf_counter() - generated}
        if extra_scores is not None:
            scores.update(extra_scores(point, neighbours, records, images))
        if on_point is not None:
            on_point(point.name, point.params(),
                     {**scores, **timing, "images_per_s": len(images) / (time.perf_counter() - start)}, "grid_point")
        rows.append({"point": point.name, **point.params(), **scores, **timing})
        images_by_point[point.name] = images
    return rows, images_by_point, per_image


def score_baseline(neighbours: Neighbours, index: str, index_fraction: float, *, prompts: list[str], seeds: int,
                   encoder: TextEncoder, scorer: ImageScorer, out: Path, bootstrap: BootstrapConfig,
                   on_point: PointFn | None = None) -> tuple[dict, np.ndarray, PointScores]:
    """The first retrieved image per prompt, written to ``out/retrieval_baseline/`` and scored as S x P
    images like a grid point (the same image for every seed): (row, images, per-image values)."""
    picked = retrieval_baseline(neighbours.knn, neighbours.sidecar, neighbours.images, prompts,
                                encoder.encode_texts(prompts), out / BASELINE)
    scores, per_image = score_with_intervals(scorer, np.concatenate([picked] * seeds), list(prompts) * seeds, seeds,
                                             bootstrap, out / SCORES / BASELINE)
    settings = {"k": 1, "guidance": "-", "index_fraction": index_fraction, "index": index}
    if on_point is not None:
        on_point(BASELINE, settings, scores, BASELINE)
    return {"point": BASELINE, **settings, **scores}, picked, per_image


def write_table(path: Path, rows: list[dict]) -> None:
    """One line per grid point, every metric a column; timings stay out (outputs are byte-reproducible,
    timings are metrics). A row without a metric's value is an error, never a blank."""
    columns = [*metric_columns(), *interval_columns()]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["point", "k", "index_fraction", "guidance", "index", *columns],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, **{m: f"{row[m]:.6f}" for m in columns}} for row in rows)


def metrics_summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{point: {metric: value}} for every metric of the table and its CI bounds (the stage's metrics file)."""
    return {row["point"]: {m: round(float(row[m]), 6) for m in [*metric_columns(), *interval_columns()]}
            for row in rows}


def differences_to_no_knn(rows: list[dict], per_image: dict[str, PointScores], reference: Reference,
                          bootstrap: BootstrapConfig) -> dict[str, dict[str, float]]:
    """Every point that retrieves (and the retrieval baseline) minus the k=0 point of its guidance (the first
    k=0 point for the baseline), paired on the same prompts and seeds: {"<point> - <k0 point>": {metric:
    difference, metric_ci_low, metric_ci_high}}."""
    no_knn = {row["guidance"]: row["point"] for row in rows if row["k"] == 0 and row["point"] != BASELINE}
    out = {}
    for row in rows:
        if row["k"] == 0 or not no_knn:
            continue
        other = no_knn.get(row["guidance"], next(iter(no_knn.values())))
        diffs = paired_differences(per_image[row["point"]], per_image[other], reference,
                                   resamples=bootstrap.resamples, set_resamples=bootstrap.set_resamples,
                                   seed=bootstrap.seed)
        out[f"{row['point']} - {other}"] = {key: round(value, 6) for metric, interval in diffs.items()
                                             for key, value in interval.as_dict(metric).items()}
    return out
