"""DVC stage ``evaluate@<model>``: one trained model over an inference-time grid, scored against held-out images.

``--model continuous|discrete`` picks the backbone (``models/<model>``), its sampler and the guidance
scales of the grid (``evaluate.<model>``); both backbones are scored on the same prompts, seeds,
reference images and metrics, so ``metrics/evaluate-continuous.json`` and ``-discrete.json`` compare them.

Prompts are the captions of the generator dataset's ``evaluate.split`` (test; val to choose settings) or
``evaluate.prompts_file``; that split's images are the FID/KID reference. Every grid point (k, index fraction,
guidance, retrieval index, score quantile) is generated with the same model and seeds and becomes one MLflow
child run of this stage's run, so the MLflow UI compares the points side by side; the first retrieved image
per prompt is scored the same way as the retrieval baseline. Each point has ``evaluate.count`` prompts (0:
every captioned image of the split) x ``evaluate.seeds`` images; every metric carries a bootstrap 95% CI over
prompts, and every retrieving point (and the baseline) its difference to the k=0 point of its guidance with a
paired CI (``differences`` in the metrics file, ``difference/...`` metrics of the stage's run); the per-image
values behind them go to ``scores/<point>/`` and each point's MLflow run. Outputs: a generate-style folder per
point under ``outputs/evaluate/<model>/``, ``points.csv``, a prompts x settings ``grid.png``, with
score-quantile points ``score_quantiles.csv`` and the paper's Fig. 8 as ``score_quantiles.png``, the facts in
``evaluate.json``, and the numbers in ``metrics/evaluate-<model>.json``. The stage's MLflow run and its point
runs are tagged ``model``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time

import numpy as np
import pandas as pd

from knn_diffusion.backbones import load_generator
from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.evaluation.grid import BASELINE, draw, grid_points, settings_grid, split_prompts
from knn_diffusion.evaluation.metrics import ImageScorer, KidSettings, inception_features, metric_columns
from knn_diffusion.evaluation.runner import (
    SCORES,
    differences_to_no_knn,
    metrics_summary,
    score_baseline,
    score_grid,
    write_table,
)
from knn_diffusion.evaluation.score_quantiles import COLUMNS as QUANTILE_COLUMNS
from knn_diffusion.evaluation.score_quantiles import plot_score_quantiles, point_score_metrics
from knn_diffusion.generation import read_prompts
from knn_diffusion.images import save_png
from knn_diffusion.io import atomic_dir, save_npy, write_json
from knn_diffusion.models.config import ConditioningVariant
from knn_diffusion.retrieval.backends import ServiceUnavailable, open_backend
from knn_diffusion.retrieval.scores import resolve_scorer
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked
from knn_diffusion.stages.judging import judge_name, load_judge
from knn_diffusion.tracking import child_run, model_run_id

log = logging.getLogger(__name__)


def held_out(params, store: ImageStore) -> tuple[list[str], np.ndarray, bool]:
    """(prompts, reference image rows, whether prompt i describes reference image i)."""
    cfg = params.evaluate
    split = cfg.split.value
    if cfg.prompts_file:
        prompts = read_prompts(cfg.prompts_file, within=paths.PROMPTS)[:cfg.count or None]
        if len(prompts) < 2:
            raise ValueError(f"evaluate.prompts_file {cfg.prompts_file}: expected at least 2 prompts, one per line")
        return prompts, draw(store.rows(split), cfg.count, cfg.seed), False
    prompts, rows = split_prompts(store, split, cfg.count, cfg.seed, params.encoder.prompt_template)
    if len(prompts) < 2:
        raise ValueError(f"evaluate.count={cfg.count}: {len(prompts)} captioned {split} image(s); at least 2 needed")
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
    judge = load_judge(params)
    scorer = ImageScorer(judge, reference,
                         feature_network=inception_features(cfg.inception_weights) if cfg.inception_weights else None,
                         kid_settings=KidSettings(cfg.kid_subsets, cfg.kid_subset_size, cfg.seed),
                         r_candidates=cfg.r_precision_candidates, r_seed=cfg.r_precision_seed)
    points = grid_points(cfg.grid, sampler.guidance, generator.conditioning)
    backend = open_backend(params.retrieval, paths.retrieval_roots(), encoder.fingerprint, encoder.dim)
    log.info("%d prompts (%s), %d reference images, %d grid points, features %s", len(prompts),
             cfg.prompts_file or f"{cfg.split.value}-split captions", len(reference), len(points),
             scorer.feature)
    common = {"split": cfg.split.value, "fid_feature": scorer.feature, "judge": judge_name(judge),
              "backbone": generator.backbone,
              "variant": ConditioningVariant(generator.conditioning.variant).value,
              "trained_k": generator.conditioning.k, "seeds": cfg.seeds, "seed": cfg.seed,
              "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
              "model_run_id": generator.run_id, "count": len(prompts), "steps": sampler.steps, **generator.settings}

    def search(point):
        retrieval = dataclasses.replace(params.retrieval, index_fraction=point.index_fraction or 1.0,
                                        score_quantile=point.score_quantile or 0)
        return backend.open(point.index or cfg.grid.index[0], retrieval)

    def quantile_scores(point, neighbours, records, images) -> dict:
        """Paper Fig. 8: a score-quantile point's images scored against their neighbours' scores."""
        if not point.score_quantile:
            return {}
        return point_score_metrics(records, images, neighbours.scores, params.index.scorer,
                                   params.index.scorer_weights, encoder, cfg.seed)

    def log_point(name: str, settings: dict, values: dict, kind: str) -> None:
        with child_run(name, {**common, **settings}, {"evaluate.kind": kind}) as child:
            child.metrics(values)
            for part in sorted((out / SCORES / name).iterdir()):  # per-image values: the report's paired CIs
                child.artifact(part, SCORES)
        log.info("%s: %s", name, ", ".join(f"{m} {values[m]:.4f}" for m in metric_columns()))

    started = time.perf_counter()
    with (tracked(f"evaluate@{model}", params, tags={"model": model}) as run,
          atomic_dir(paths.evaluate_dir(model)) as out):
        run.tags({"fid_feature": scorer.feature})
        save_npy(out / SCORES / "reference.npy", scorer.reference.numpy().astype(np.float32))
        run.artifact(out / SCORES / "reference.npy", SCORES)
        table, columns, per_image = score_grid(
            generator, points, search, prompts=prompts, seeds=cfg.seeds, encoder=encoder, scorer=scorer, out=out,
            steps=sampler.steps, seed=cfg.seed, batch_size=cfg.batch_size, bootstrap=cfg.bootstrap,
            extra_scores=quantile_scores, on_point=log_point)
        columns = {"reference": reference, **columns} if paired else columns
        if cfg.retrieval_baseline:
            index = cfg.grid.index[0]
            row, columns[BASELINE], per_image[BASELINE] = score_baseline(
                backend.open(index), index, params.retrieval.index_fraction, prompts=prompts, seeds=cfg.seeds,
                encoder=encoder, scorer=scorer, out=out, bootstrap=cfg.bootstrap, on_point=log_point)
            table.append(row)
        differences = differences_to_no_knn(table, per_image, scorer.reference_statistics, cfg.bootstrap)
        run.metrics({f"difference/{pair}/{key}": value for pair, values in differences.items()
                     for key, value in values.items()})
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
        source = cfg.prompts_file or f"{cfg.split.value}_split_captions"
        write_json(out / "evaluate.json", {**common, "prompts_source": source,
                                           "prompts": prompts, "reference_rows": reference_rows.tolist(),
                                           "grid_columns": list(columns)})
        run.image(grid, "evaluate/grid.png")
        run.text("\n".join(columns), "evaluate/grid_columns.txt")
        run.artifact(out / "points.csv", "evaluate")
        seconds = time.perf_counter() - started
        run.metrics({"seconds": seconds})
    write_json(paths.evaluate_metrics(model), {**metrics_summary(table), "differences": differences,
                                               "seconds": round(seconds, 1)})


def main(argv: list[str] | None = None) -> None:
    run_stage("evaluate", evaluate_stage, argv,
              user_errors=(FileNotFoundError, ValueError, ModuleNotFoundError, ServiceUnavailable),
              per_model=True)


if __name__ == "__main__":
    main()
