"""What the 95% CIs cost per evaluate point, against scoring the point without them (same process).

The study scores every point on P prompts x S seeds; this times, on random features of that shape (the
judge's d = 256), the point's metrics as the evaluate stage computes them (torchmetrics FID and KID, CLIP
score, R-precision) and then the CIs (``point_intervals``) and one paired difference (``paired_differences``,
what each retrieving point adds for its k=0 comparison). Prints a table; ``--json`` writes it.

    OMP_NUM_THREADS=1 python benchmarks/bench_intervals.py --prompts 358 --seeds 2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from knn_diffusion.evaluation.intervals import PointScores, Reference, paired_differences, point_intervals
from knn_diffusion.evaluation.metrics import KidSettings, clip_score, fid, kid, r_precision

from timing import clock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=358)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--set-resamples", type=int, default=200)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    n = args.prompts * args.seeds
    reference = rng.normal(size=(args.prompts, args.dim))
    features, images, texts = (rng.normal(size=(n, args.dim)) for _ in range(3))
    prompts = [f"p{i % args.prompts}" for i in range(n)]

    def metrics() -> dict[str, float]:
        real, fake = torch.from_numpy(reference), torch.from_numpy(features)
        return {"fid": fid(real, fake), "kid_mean": kid(real, fake, KidSettings())[0],
                "clip_score": clip_score(images, texts), "r_precision": r_precision(images, texts, 20, labels=prompts)}

    values, metric_s = clock(metrics)
    scores = PointScores.from_rows(rng.uniform(size=n), rng.integers(0, 2, n), features, args.seeds)
    other = PointScores.from_rows(rng.uniform(size=n), rng.integers(0, 2, n), rng.normal(size=(n, args.dim)),
                                  args.seeds)
    settings = {"resamples": args.resamples, "set_resamples": args.set_resamples}
    _, interval_s = clock(lambda: point_intervals(scores, Reference(reference), values, **settings))
    _, paired_s = clock(lambda: paired_differences(scores, other, Reference(reference), **settings))
    figures = {"prompts": args.prompts, "seeds": args.seeds, "images": n, "dim": args.dim, **settings,
               "metrics_s": round(metric_s, 3), "intervals_s": round(interval_s, 3), "paired_s": round(paired_s, 3),
               "intervals_x_metrics": round(interval_s / metric_s, 2)}
    print(" | ".join(figures))
    print(" | ".join(str(v) for v in figures.values()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
