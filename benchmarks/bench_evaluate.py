"""Evaluation throughput: images/s generated and images/s scored, and the evaluate stage's share of the demo.

Builds the demo's architectures from params.yaml (the U-Net preset of ``train_continuous`` and the
encoder of ``encoder``, MiniLM text tower included) with random weights - speed does not depend on the
weights - and times, after one warm-up:

* generation: ``Generator.sample`` at ``evaluate.batch_size`` with ``evaluate.continuous.steps`` sampler steps,
  once with the trained k neighbours (1+k condition tokens) and once with k=0;
* scoring: ``ImageScorer.score`` (FID + KID on CLIP image features, CLIP score, R-precision) of
  ``evaluate.count`` images against as many reference images (features extracted once, as in the stage).

From these it projects the default grid's stage time (its points x count images + the baseline) and,
with ``--demo-seconds`` (the whole ``make demo`` wall time), its share of the demo.

    OMP_NUM_THREADS=2 python benchmarks/bench_evaluate.py --demo-seconds 589
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from knn_diffusion.config import load_params
from knn_diffusion.encoders.aligned import build_aligned
from knn_diffusion.evaluation.grid import grid_points
from knn_diffusion.evaluation.metrics import ImageScorer, KidSettings
from knn_diffusion.models.continuous.generator import ContinuousGenerator
from knn_diffusion.models.continuous.training import denoiser_config
from knn_diffusion.models.continuous.unet import ContinuousDenoiser

from timing import call_times, clock, median  # benchmarks/timing.py, beside this script


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    return median(call_times(lambda i: fn(), warmup=1, min_runs=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--demo-seconds", type=float, default=None, help="wall time of the whole make demo")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    params = load_params(args.params)
    cfg = params.evaluate
    encoder = build_aligned(params.encoder.vision)
    model = ContinuousDenoiser(denoiser_config(params.train_continuous, params.data.resolution, encoder.dim)).eval()
    generator = ContinuousGenerator(model, cfg.continuous.scheduler)
    trained = generator.conditioning
    batch, count = cfg.batch_size, cfg.count
    rng = np.random.default_rng(0)
    figures = {"threads": torch.get_num_threads(), "preset": params.train_continuous.preset,
               "resolution": params.data.resolution, "steps": cfg.continuous.steps, "batch_size": batch, "count": count}
    for k in (trained.k, 0):
        cond = rng.normal(size=(batch, 1 + k, encoder.dim)).astype(np.float32)
        seconds = timed(lambda: generator.sample(cond, guidance=3.0, steps=cfg.continuous.steps, seeds=range(batch)),
                        args.repeats)
        figures[f"generate_images_per_s_k{k}"] = batch / seconds
        print(f"generate k={k}: {batch / seconds:.2f} images/s", flush=True)
    side = params.data.resolution
    images = rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    prompts = [f"an emoji of thing {i}" for i in range(count)]
    scorer, figures["reference_features_s"] = clock(lambda: ImageScorer(
        encoder, images[::-1].copy(), kid_settings=KidSettings(cfg.kid_subsets, cfg.kid_subset_size),
        r_candidates=cfg.r_precision_candidates))
    figures["score_images_per_s"] = count / timed(lambda: scorer.score(images, prompts), args.repeats)
    points = grid_points(cfg.grid, cfg.continuous.guidance, trained)
    generated = sum(count / figures[f"generate_images_per_s_k{p.k if p.k == 0 else trained.k}"] for p in points)
    scored = (len(points) + cfg.retrieval_baseline) * count / figures["score_images_per_s"]
    figures.update(grid_points=len(points), projected_stage_s=generated + scored + figures["reference_features_s"],
                   evaluate_images_per_s=len(points) * count / (generated + scored))
    if args.demo_seconds:
        figures["share_of_demo"] = figures["projected_stage_s"] / args.demo_seconds
    for key, value in figures.items():
        print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
