"""DVC stage ``evaluate@<model>``: one trained model over an inference-time grid, scored against held-out images.

``--model continuous|discrete`` picks the backbone (``models/<model>``), its sampler and the guidance
scales of the grid (``evaluate.<model>``); both backbones are scored on the same prompts, seeds,
reference images and metrics, so ``metrics/evaluate-continuous.json`` and ``-discrete.json`` compare them.

Prompts are the generator dataset's test-split captions (or ``evaluate.prompts_file``); the test split's
images are the FID/KID reference. Every grid point (k, index fraction, guidance, retrieval index, score quantile) is
generated with the same model and seeds and becomes one MLflow child run of this stage's run, so the
MLflow UI compares the points side by side; the first retrieved image per prompt is scored the same
way as the retrieval baseline. Outputs: a generate-style folder per point under ``outputs/evaluate/<model>/``,
``points.csv``, a prompts x settings ``grid.png``, with score-quantile points ``score_quantiles.csv`` and
the paper's Fig. 8 as ``score_quantiles.png``, the facts in ``evaluate.json``, and the numbers in
``metrics/evaluate-<model>.json``. The stage's MLflow run and its point runs are tagged ``model``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.factory import load_encoder, load_open_clip
from knn_diffusion.evaluation.grid import (BASELINE, draw, grid_points, retrieval_baseline, settings_grid,
                                           test_split_prompts)
from knn_diffusion.evaluation.metrics import ImageScorer, KidSettings, inception_features
from knn_diffusion.evaluation.score_quantiles import COLUMNS as QUANTILE_COLUMNS
from knn_diffusion.evaluation.score_quantiles import plot_score_quantiles, point_score_metrics
from knn_diffusion.generation import generate, read_prompts
from knn_diffusion.images import save_png
from knn_diffusion.io import atomic_dir, write_json
from knn_diffusion.models.backbones import load_generator
from knn_diffusion.models.config import ConditioningVariant
from knn_diffusion.retrieval.backends import open_backend
from knn_diffusion.retrieval.scores import resolve_scorer
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked
from knn_diffusion.stages.embed import EVAL_TEMPLATE
from knn_diffusion.tracking import child_run, model_run_id

log = logging.getLogger(__name__)
METRIC_NAMES = ("fid", "kid_mean", "kid_std", "clip_score", "r_precision")


def read_images(folder: Path, records: list[dict]) -> np.ndarray:
    """The PNGs ``generate`` wrote, in record order: uint8 (N, H, W, 3) - exactly what is scored."""
    return np.stack([np.asarray(Image.open(folder / r["image"]).convert("RGB")) for r in records])


def held_out(params, store: ImageStore) -> tuple[list[str], np.ndarray, bool]:
    """(prompts, reference image rows, whether prompt i describes reference image i)."""
    cfg = params.evaluate
    if cfg.prompts_file:
        prompts = read_prompts(cfg.prompts_file, within=paths.PROMPTS)[:cfg.count]
        if len(prompts) < 2:
            raise ValueError(f"evaluate.prompts_file {cfg.prompts_file}: expected at least 2 prompts, one per line")
        return prompts, draw(store.rows("test"), cfg.count, cfg.seed), False
    prompts, rows = test_split_prompts(store, cfg.count, cfg.seed, EVAL_TEMPLATE)
    return prompts, rows, True


def evaluate_stage(params, model: str) -> None:
    cfg = params.evaluate
    sampler = getattr(cfg, model)  # evaluate.continuous / evaluate.discrete
    store = ImageStore.open(paths.dataset_dir(params.data.generator_dataset))
    prompts, reference_rows, paired = held_out(params, store)
    reference = store[reference_rows]
    generator = load_generator(paths.model_dir(model), backbone=model, **sampler.generator_options())
    generator.run_id = model_run_id(paths.model_dir(model), params.tracking.experiment,
                                     params.tracking.tracking_uri) or generator.run_id
    encoder = load_encoder(params.encoder, paths.ENCODER)  # the generator's text encoder (queries, retrieval)
    judge = load_open_clip(cfg.clip_model, cfg.clip_pretrained) if cfg.clip_model else encoder
    scorer = ImageScorer(judge, reference,
                         feature_network=inception_features(cfg.inception_weights) if cfg.inception_weights else None,
                         kid_settings=KidSettings(cfg.kid_subsets, cfg.kid_subset_size, cfg.seed),
                         r_candidates=cfg.r_precision_candidates, r_seed=cfg.r_precision_seed)
    points = grid_points(cfg.grid, sampler.guidance, generator.conditioning)
    backend = open_backend(params.retrieval, paths.retrieval_roots(), encoder.fingerprint, encoder.dim)
    log.info("%d prompts (%s), %d reference images, %d grid points, features %s", len(prompts),
             cfg.prompts_file or "test-split captions", len(reference), len(points), scorer.feature)
    common = {"fid_feature": scorer.feature, "eval_encoder": judge.fingerprint, "backbone": generator.backbone,
              "variant": ConditioningVariant(generator.conditioning.variant).value, "trained_k": generator.conditioning.k,
              "model_run_id": generator.run_id, "count": len(prompts), "steps": sampler.steps, **generator.settings}
    table: list[dict] = []
    columns = {"reference": reference} if paired else {}
    started = time.perf_counter()
    with tracked(f"evaluate@{model}", params, tags={"model": model}) as run, atomic_dir(paths.evaluate_dir(model)) as out:
        run.tags({"fid_feature": scorer.feature})
        for point in tqdm(points, desc="evaluate", unit="point"):
            retrieval = dataclasses.replace(params.retrieval, index_fraction=point.index_fraction or 1.0,
                                            score_quantile=point.score_quantile or 0)
            neighbours = backend.open(point.index or cfg.grid.index[0], retrieval)
            start = time.perf_counter()
            records = generate(generator, out_dir=out / point.name, knn=neighbours.knn, prompts=prompts,
                               encoder=encoder, k=point.k, guidance=point.guidance, steps=sampler.steps,
                               seed=cfg.seed, batch_size=cfg.batch_size, index_sidecar=neighbours.sidecar)
            images = read_images(out / point.name, records)
            generated = time.perf_counter()
            scores = scorer.score(images, prompts)
            timing = {"generate_s": generated - start, "score_s": time.perf_counter() - generated}
            if point.score_quantile:  # paper Fig. 8: the images' score against their neighbours'
                scores.update(point_score_metrics(records, images, neighbours.score_column, params.index.scorer,
                                                  params.index.scorer_weights, encoder, cfg.seed))
            with child_run(point.name, {**common, **point.params()}, {"evaluate.kind": "grid_point"}) as child:
                child.metrics({**scores, **timing, "images_per_s": len(images) / (time.perf_counter() - start)})
            table.append({"point": point.name, **point.params(), **scores, **timing})
            columns[point.name] = images
            log.info("%s: %s", point.name, ", ".join(f"{m} {scores[m]:.4f}" for m in METRIC_NAMES))
        if cfg.retrieval_baseline:
            index = cfg.grid.index[0]
            neighbours = backend.open(index)
            images = retrieval_baseline(neighbours.knn, neighbours.sidecar, neighbours.images, prompts,
                                        encoder.encode_texts(prompts), out / BASELINE)
            scores = scorer.score(images, prompts)
            baseline = {"k": 1, "guidance": "-", "index_fraction": params.retrieval.index_fraction, "index": index}
            with child_run(BASELINE, {**common, **baseline}, {"evaluate.kind": BASELINE}) as child:
                child.metrics(scores)
            table.append({"point": BASELINE, **baseline, **scores})
            columns[BASELINE] = images
        write_table(out / "points.csv", table)
        quantile_rows = pd.DataFrame([row for row in table if row.get("score_quantile") not in (None, 0, "-")])
        if len(quantile_rows):
            quantile_rows["label"] = [f"k{r.k} frac{r.index_fraction:g} g{r.guidance:g} {r.index}"
                                      for r in quantile_rows.itertuples()]
            quantile_rows[["point", "label", "score_quantile", *QUANTILE_COLUMNS]].to_csv(
                out / "score_quantiles.csv", index=False, float_format="%.6f")
            plot_score_quantiles(quantile_rows, out / "score_quantiles.png",
                                 resolve_scorer(params.index.scorer, params.index.scorer_weights).value)
            run.artifact(out / "score_quantiles.png", "evaluate")
        grid = settings_grid(columns, cfg.grid_prompts)
        save_png(out / "grid.png", grid)
        write_json(out / "evaluate.json", {**common, "prompts_source": cfg.prompts_file or "test_split_captions",
                                           "prompts": prompts, "reference_rows": reference_rows.tolist(),
                                           "grid_columns": list(columns)})
        run.image(grid, "evaluate/grid.png")
        run.text("\n".join(columns), "evaluate/grid_columns.txt")
        run.artifact(out / "points.csv", "evaluate")
        seconds = time.perf_counter() - started
        run.metrics({"seconds": seconds})
    write_json(paths.evaluate_metrics(model), {
        **{row["point"]: {m: round(float(row[m]), 6) for m in METRIC_NAMES} for row in table},
        "seconds": round(seconds, 1)})


def write_table(path: Path, rows: list[dict]) -> None:
    """One line per grid point; timings stay out (outputs are byte-reproducible, timings are metrics)."""
    fields = ["point", "k", "index_fraction", "guidance", "index", *METRIC_NAMES]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, **{m: f"{row[m]:.6f}" for m in METRIC_NAMES}} for row in rows)


def main(argv: list[str] | None = None) -> None:
    run_stage("evaluate", evaluate_stage, argv, user_errors=(FileNotFoundError, ValueError, ModuleNotFoundError),
              per_model=True)


if __name__ == "__main__":
    main()
