"""Throughput of ``embed_collection`` (the embed stage's work) against the bare encoder forward.

Both run in one process on the same images in the same batches:

* bare: ``encoder.encode_images(batch)`` on batches already in RAM - the model's cost alone;
* store: ``embed_collection`` from the image collection to a fresh store directory - image reads,
  sharding, float16 cast, atomic writes, progress bar included.

Each variant runs --repeats times, alternating (bare, store, bare, store, ...) after a warm-up, and the
fastest run of each is reported (the least disturbed by other processes). Overhead = bare/store - 1 in
images/s. Images: an ingested collection (--images, default data/ingest/openmoji) or, when it is
missing, seeded random uint8 images; the encoder: a trained aligned folder (--encoder-dir) or a
freshly built aligned model of the default size (same cost).

    python benchmarks/bench_embed.py
    python benchmarks/bench_embed.py --images data/ingest/openmoji --encoder-dir data/encoder --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.aligned import CONFIG_FILE, build_aligned, load_aligned
from knn_diffusion.encoders.config import EmbedConfig, VisionTowerConfig
from knn_diffusion.encoders.store import embed_collection
from knn_diffusion.io import write_json

from timing import clock  # benchmarks/timing.py, beside this script


def load_inputs(args):
    if (Path(args.images) / "manifest.parquet").is_file():
        images = ImageStore.open(args.images)
        source = str(args.images)
    else:
        images = np.random.default_rng(0).integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
        source = f"random uint8 {images.shape}"
    if (Path(args.encoder_dir) / CONFIG_FILE).is_file():
        encoder, name = load_aligned(args.encoder_dir), f"aligned ({args.encoder_dir})"
    else:
        encoder, name = build_aligned(VisionTowerConfig()), "aligned, default size, untrained"
    return images, source, encoder, name


def time_bare(encoder, batches) -> float:
    return clock(lambda: [encoder.encode_images(batch, batch_size=len(batch)) for batch in batches])[1]


def time_store(encoder, images, ids, cfg: EmbedConfig, workdir: Path) -> float:
    out = workdir / "store"
    shutil.rmtree(out, ignore_errors=True)
    return clock(lambda: embed_collection(encoder, images, ids, out, shard_size=cfg.shard_size,
                                          batch_size=cfg.batch_size, dtype=cfg.dtype.value))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default="data/ingest/openmoji")
    parser.add_argument("--encoder-dir", default="data/encoder")
    parser.add_argument("--n", type=int, default=4096, help="random images when --images is missing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default="benchmarks/results/bench_embed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = EmbedConfig()

    images, source, encoder, encoder_name = load_inputs(args)
    ids = np.arange(len(images), dtype=np.int64)
    # The same batches the stage forms: consecutive ids from each shard's start.
    batches = [images[ids[s:s + cfg.batch_size]] for shard in range(0, len(ids), cfg.shard_size)
               for s in range(shard, min(shard + cfg.shard_size, len(ids)), cfg.batch_size)]
    encoder.encode_images(batches[0])  # warm-up

    bare, store = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            bare.append(time_bare(encoder, batches))
            store.append(time_store(encoder, images, ids, cfg, Path(tmp)))
    bare_ips, store_ips = len(ids) / min(bare), len(ids) / min(store)
    overhead = bare_ips / store_ips - 1

    print(f"images: {source} ({len(ids)}), encoder: {encoder_name}, dim {encoder.dim}")
    print(f"batch {cfg.batch_size}, shard {cfg.shard_size}, dtype {cfg.dtype.value}, "
          f"torch threads {args.threads}, best of {args.repeats}")
    print(f"{'variant':<28}{'images/s':>12}{'best s':>10}{'all runs s':>28}")
    for label, ips, runs in (("bare encode_images", bare_ips, bare), ("embed_collection", store_ips, store)):
        print(f"{label:<28}{ips:>12.1f}{min(runs):>10.2f}{' '.join(f'{r:.2f}' for r in runs):>28}")
    print(f"overhead of the stage: {overhead:+.1%} (limit +15%)")
    write_json(args.json, {"images": source, "count": len(ids), "encoder": encoder_name, "dim": encoder.dim,
                           "batch_size": cfg.batch_size, "shard_size": cfg.shard_size, "dtype": cfg.dtype.value,
                           "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "bare_runs_s": bare, "store_runs_s": store,
                           "bare_images_per_s": bare_ips, "store_images_per_s": store_ips,
                           "overhead": overhead})


if __name__ == "__main__":
    main()
