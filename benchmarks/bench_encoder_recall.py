"""Text->image recall on the unseen OpenMoji test names: the encoder as params.yaml sets it (the baseline) against
variants of it, each trained from scratch in the same process on the ingested paired styles.

A variant is ``NAME=KEY=VALUE[,KEY=VALUE...]`` (params overrides). Recall is split into names with and without
"skin tone" (165 of 358 test names), to tell fine-grained misses from unseen concepts. Needs ``dvc repro
ingest`` first. Prints a table; ``--json`` writes it.

    python benchmarks/bench_encoder_recall.py steps2000=encoder.alignment.steps=2000 \
        batch512=encoder.alignment.batch_size=512 patch4=encoder.vision.patch_size=4
"""

from __future__ import annotations

import argparse
import json
import tempfile

from knn_diffusion.config import load_params
from knn_diffusion.encoders.alignment import text_to_image_recall, train_alignment
from knn_diffusion.stages.encoder import held_out_eval, paired_corpus

from timing import clock


def measure(name: str, overrides: list[str], section: str) -> dict:
    params = load_params("params.yaml", overrides)
    cfg = getattr(params, section)
    generator, rows, names = held_out_eval(params)
    corpus = paired_corpus(params, cfg, names)
    with tempfile.TemporaryDirectory() as folder:
        encoder, seconds = clock(lambda: train_alignment(corpus.images, corpus.names, cfg, folder, resume=False))
    images, templates = generator[rows], tuple(cfg.alignment.templates)
    recall = text_to_image_recall(encoder, images, names, ks=(1, 5, 10), templates=templates)
    subsets = {label: [n if isinstance(n, str) and (("skin tone" in n) == tones) else None for n in names]
               for label, tones in (("tones", True), ("plain", False))}
    split = {f"recall@10 {label}": text_to_image_recall(encoder, images, subset, ks=(10,),
                                                         templates=templates)["recall@10"]
             for label, subset in subsets.items()}
    return {"variant": name, "overrides": overrides, "pairs": len(corpus.images), "train_s": round(seconds, 1),
            **{k: recall[k] for k in ("recall@1", "recall@5", "recall@10", "median_rank")}, **split}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", help="NAME=KEY=VALUE[,KEY=VALUE...]")
    parser.add_argument("--section", default="encoder", help="encoder or judge")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    variants = [("params.yaml", [])] + [(v.split("=", 1)[0], v.split("=", 1)[1].split(",")) for v in args.variants]
    rows = []
    for name, overrides in variants:
        rows.append(measure(name, overrides, args.section))
        base, row = rows[0], rows[-1]
        print(f"{name:>16}: pairs {row['pairs']:>6}, train {row['train_s']:>6.1f} s, recall@1 {row['recall@1']:.3f}, "
              f"@5 {row['recall@5']:.3f}, @10 {row['recall@10']:.3f} (x{row['recall@10'] / base['recall@10']:.2f}; "
              f"tones {row['recall@10 tones']:.3f}, plain {row['recall@10 plain']:.3f}), median rank "
              f"{row['median_rank']:g}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
