"""Both trained backbones on the same held-out prompts, scored with the evaluate stage's metrics.

Run from the repository root after `make demo` (both `models/continuous` and `models/discrete` exist):

    .venv/bin/python benchmarks/compare_backbones.py [--discrete-steps 100] [--json out.json]

Each backbone samples the `evaluate.count` test-split prompts with k = its training k from the full
generator index, at its own default guidance (continuous 3, discrete 8, the paper's lambda), and is
scored against the test split's images like an `evaluate` grid point (FID/KID on the evaluation
encoder's features, CLIP score, R-precision). Prints a table and the seconds each took.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from knn_diffusion.config import load_params
from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.evaluation.grid import test_split_prompts
from knn_diffusion.evaluation.metrics import ImageScorer, KidSettings
from knn_diffusion.generation import generate, load_generator, neighbour_search
from knn_diffusion.stages import paths
from knn_diffusion.stages.embed import EVAL_TEMPLATE
from knn_diffusion.stages.evaluate import read_images

SETTINGS = {"continuous": {"guidance": 3.0, "steps": 25}, "discrete": {"guidance": 8.0, "steps": 100}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--discrete-steps", type=int, default=100)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    SETTINGS["discrete"]["steps"] = args.discrete_steps
    params = load_params()
    cfg = params.evaluate
    store = ImageStore.open(paths.dataset_dir(params.data.generator_dataset))
    prompts, rows = test_split_prompts(store, cfg.count, cfg.seed, EVAL_TEMPLATE)
    encoder = load_encoder(params.encoder, paths.ENCODER)
    scorer = ImageScorer(encoder, store[rows], kid_settings=KidSettings(cfg.kid_subsets, cfg.kid_subset_size, cfg.seed),
                         r_candidates=cfg.r_precision_candidates, r_seed=cfg.r_precision_seed)
    knn, sidecar = neighbour_search(params.data.generator_dataset, paths.INDEX, paths.EMBED, encoder.fingerprint,
                                    encoder.dim, params.retrieval)
    results = {}
    for backbone, settings in SETTINGS.items():
        generator = load_generator(paths.model_dir(backbone), backbone=backbone)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            records = generate(generator, out_dir=out, knn=knn, prompts=prompts, encoder=encoder, seed=cfg.seed,
                               batch_size=cfg.batch_size, index_sidecar=sidecar, **settings)
            images = read_images(Path(out), records)
        seconds = time.perf_counter() - start
        results[backbone] = {**scorer.score(images, prompts), **settings, "k": generator.conditioning.k,
                             "images": len(images), "seconds": round(seconds, 1)}
    columns = ["fid", "kid_mean", "kid_std", "clip_score", "r_precision", "k", "guidance", "steps", "seconds"]
    print(f"{len(prompts)} test-split prompts, features {scorer.feature}")
    print("| backbone | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for backbone, row in results.items():
        print(f"| {backbone} | " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                               for c in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"feature": scorer.feature, **results}, indent=2, default=float))


if __name__ == "__main__":
    main()
