"""Logit-space guidance of the discrete model, trained without condition dropout (the paper's claim, 6.7).

From a repository where the pipeline ran (``models/discrete``, ``data/encoder``, ``data/index``): the
held-out (test-split) names of the generator dataset as prompts ("an emoji of <name>"), neighbours
retrieved from the index, images sampled unguided (lambda = 1: the conditional model alone) and with
lambda = 8 against the all-zero null condition, and the CLIP score of each set (mean cosine between
the encoder's embedding of each image and its prompt's; ``_mismatched``: against the next image's
prompt, the chance level). Prints JSON, writes both grids to --out.

    OMP_NUM_THREADS=1 python benchmarks/discrete_guidance.py --prompts 48 --out outputs/guidance
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from knn_diffusion.backbones import load_generator
from knn_diffusion.config import load_params
from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.evaluation.metrics import clip_score
from knn_diffusion.images import image_grid, save_png
from knn_diffusion.retrieval.backends import open_backend
from knn_diffusion.stages import paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 8.0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--truncation", type=float, default=None, help="default: as in training previews")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/guidance"))
    args = parser.parse_args(argv)
    params = load_params()
    name = params.data.generator_dataset
    images = ImageStore.open(paths.dataset_dir(name))
    captions = images.read_captions().loc[images.rows("test")].dropna()
    names = sorted({c for c in captions if c.strip()})
    pick = np.linspace(0, len(names) - 1, min(args.prompts, len(names))).astype(int)
    prompts = [params.encoder.prompt_template.format(name=names[i]) for i in pick]

    generator = load_generator(paths.DISCRETE_MODEL, backbone="discrete")
    if args.truncation is not None:
        generator.truncation = args.truncation
    encoder = load_encoder(params.encoder, paths.ENCODER)
    knn = open_backend(params.retrieval, paths.retrieval_roots(), encoder.fingerprint, encoder.dim).open(name).knn
    queries = np.asarray(encoder.encode_texts(prompts), dtype=np.float32)  # (P, d)
    k = generator.conditioning.k
    _, _, neighbours = knn(queries, k)
    cond = np.concatenate([queries[:, None], np.asarray(neighbours, dtype=np.float32)], axis=1)  # (P, 1+k, d)
    seeds = [args.seed + i for i in range(len(prompts))]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"prompts": len(prompts), "steps": args.steps, "truncation": generator.truncation, "k": k}
    for guidance in args.guidance:
        batches = [generator.sample(cond[s:s + 16], guidance=guidance, steps=args.steps, seeds=seeds[s:s + 16])
                   for s in range(0, len(prompts), 16)]
        generated = np.concatenate(batches)
        embedded = encoder.encode_images(generated)
        report[f"clip_score_g{guidance:g}"] = round(clip_score(embedded, queries), 4)
        # chance level: each image against another image's prompt
        report[f"clip_score_g{guidance:g}_mismatched"] = round(clip_score(embedded, np.roll(queries, 1, axis=0)), 4)
        save_png(args.out / f"grid-g{guidance:g}.png", image_grid(generated))
    (args.out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
