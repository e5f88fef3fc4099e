"""Throughput of the continuous model: training steps/s, sampling images/s, data-loader overhead.

For each preset: (1) training steps on one fixed in-memory batch, (2) the same steps fed by the real
loader (``ConditionedImages`` over memory-mapped .npy images and embeddings), interleaved with (1) in
the same process, and (3) guided sampling (cond + null in one batched forward). The loader overhead is
median (2) / median (1) - 1. Each timing repeats until ``--min-seconds`` after warm-up steps.
Prints a table, optionally writes JSON and appends the table to docs/benchmarks.md.

    OMP_NUM_THREADS=2 python benchmarks/bench_continuous.py --presets tiny --append-docs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup

from knn_diffusion.io import atomic_path
from knn_diffusion.models.continuous.config import ContinuousTrainConfig
from knn_diffusion.models.continuous.sampler import sample
from knn_diffusion.models.continuous.training import denoiser_config, diffusion_loss
from knn_diffusion.models.continuous.unet import ContinuousDenoiser
from knn_diffusion.training.config import Precision
from knn_diffusion.training.data import ConditionedImages, StepBatchSampler, make_loader
from knn_diffusion.training.loop import autocast_dtype, optimizer_step, step_generator

from timing import call_times, clock, cuda_sync, median  # benchmarks/timing.py, beside this script

REPO = Path(__file__).resolve().parents[1]


class MemmapEmbeddings:
    def __init__(self, path: Path):
        self.array = np.load(path, mmap_mode="r")

    def get(self, positions) -> np.ndarray:
        return np.asarray(self.array[np.asarray(positions)], dtype=np.float32)


def synthetic_store(folder: Path, count: int, side: int, dim: int, k: int):
    """Memory-mapped images + embeddings + a neighbour table, like the ingest/embed/knn stages write."""
    rng = np.random.default_rng(0)
    np.save(folder / "images.npy", rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8))
    vectors = rng.normal(size=(count, dim)).astype(np.float32)
    np.save(folder / "embeddings.npy", vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    neighbours = (np.arange(count)[:, None] + rng.integers(1, count, (count, k))) % count
    return np.load(folder / "images.npy", mmap_mode="r"), MemmapEmbeddings(folder / "embeddings.npy"), neighbours


def paired_timing(fixed_step, loader_step, fetch, args, device: torch.device) -> tuple[float, float, float]:
    """Median seconds of a fixed-batch step, a loader-fed step and a bare batch fetch, interleaved.

    Alternating the two kinds of step exposes both to the same background load, so their ratio stays
    meaningful on a shared machine where absolute times drift.
    """
    sync = cuda_sync(device)
    times: dict[str, list[float]] = {"fixed": [], "loader": [], "fetch": []}

    def one_round(i: int) -> None:
        times["fixed"].append(clock(lambda: fixed_step(i), sync)[1])
        times["loader"].append(clock(lambda: loader_step(i), sync)[1])
        times["fetch"].append(clock(fetch, sync)[1])

    rounds = call_times(one_round, warmup=args.warmup, min_runs=args.min_steps, min_seconds=args.min_seconds)
    return tuple(median(times[name][-len(rounds):]) for name in ("fixed", "loader", "fetch"))


def bench_preset(preset: str, args, device: torch.device, store) -> dict:
    images, embeddings, neighbours = store
    cfg = ContinuousTrainConfig(preset=preset, k=args.k, batch_size=args.batch_size,
                                precision=Precision(args.precision))
    amp = autocast_dtype(cfg.precision, device)
    torch.manual_seed(0)
    config = denoiser_config(cfg, args.resolution, args.dim)
    model = ContinuousDenoiser(config).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, 10, 10**6)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule.value)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    def train_step(step: int, batch_images: torch.Tensor, batch_cond: torch.Tensor) -> None:
        loss = diffusion_loss(model, noise_scheduler, batch_images.to(device, non_blocking=True),
                              batch_cond.to(device, non_blocking=True), step_generator(0, 0, step),
                              cfg.cond_dropout, False, amp)
        optimizer_step(loss, model, optimizer, scaler, cfg.grad_clip)
        lr_scheduler.step()

    dataset = ConditionedImages(images, embeddings, np.arange(len(images)), neighbours, config.conditioning.k)
    fixed_images, fixed_cond = dataset.__getitems__(list(range(args.batch_size)))
    fixed_images, fixed_cond = fixed_images.to(device), fixed_cond.to(device)
    fixed = loaded = fetch = float("nan")
    if not args.sampling_only:
        loader = iter(make_loader(dataset, StepBatchSampler(len(dataset), args.batch_size, 0, 0, 10**9),
                                  args.num_workers, pin_memory=device.type == "cuda"))
        fixed, loaded, fetch = paired_timing(lambda i: train_step(i, fixed_images, fixed_cond),
                                             lambda i: train_step(i, *next(loader)), lambda: next(loader),
                                             args, device)

    model.eval()
    cond = fixed_cond[:args.sample_batch]
    per_batch = statistics.fmean(call_times(lambda i: sample(model, cond, guidance=3.0, scheduler=args.scheduler,
                                                 steps=args.sample_steps, seed=i, autocast_dtype=amp),
                                warmup=1, min_seconds=args.min_seconds, sync=cuda_sync(device)))
    return {
        "preset": preset, "params_M": round(params / 1e6, 2), "resolution": args.resolution,
        "batch_size": args.batch_size, "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
        "train_steps_per_s": round(1 / fixed, 3), "train_images_per_s": round(args.batch_size / fixed, 1),
        "loader_steps_per_s": round(1 / loaded, 3), "loader_overhead_pct": round(100 * (loaded / fixed - 1), 1),
        "fetch_ms": round(1000 * fetch, 2), "fetch_pct_of_step": round(100 * fetch / fixed, 2),
        "sample_batch": len(cond), "sample_scheduler": args.scheduler, "sample_steps": args.sample_steps,
        "sample_images_per_s": round(len(cond) / per_batch, 3), "sample_s_per_batch": round(per_batch, 2),
    }


COLUMNS = ["preset", "params_M", "resolution", "batch_size", "precision", "train_steps_per_s", "train_images_per_s",
           "loader_steps_per_s", "loader_overhead_pct", "fetch_ms", "fetch_pct_of_step", "sample_scheduler",
           "sample_batch", "sample_steps", "sample_images_per_s",
           "sample_s_per_batch"]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def append_docs(rows: list[dict], command: str, device: str) -> None:
    """Append under '## Continuous model' in docs/benchmarks.md (re-read now: others append too)."""
    path = REPO / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    entry = (f"\n### {time.strftime('%Y-%m-%d %H:%M')} on {device}\n\n`{command}`\n\n{table(rows)}\n\n"
             "train = steps on one fixed in-memory batch; loader = the same steps fed by the memory-mapped "
             "loader in the same process, interleaved with them; overhead = median loader step / median fixed "
             "step - 1; fetch = median time to produce one batch alone. Sampling: "
             "classifier-free guidance, cond + null in one batched forward.\n")
    heading = "## Continuous model"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n"
    start = text.index(heading) + len(heading)
    next_section = text.find("\n## ", start)
    insert_at = len(text) if next_section == -1 else next_section
    text = text[:insert_at].rstrip("\n") + "\n" + entry + text[insert_at:]
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256, help="embedding size d")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--images", type=int, default=4096, help="images in the synthetic memory-mapped store")
    parser.add_argument("--precision", default="auto", choices=[p.value for p in Precision])
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--scheduler", default="dpm_solver_pp_sde")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-steps", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--sampling-only", action="store_true", help="skip the training timings")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--append-docs", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        store = synthetic_store(Path(folder), args.images, args.resolution, args.dim, args.k)
        for preset in args.presets:
            rows.append(bench_preset(preset, args, device, store))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{device_name}\n{table(rows)}")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
    if args.append_docs:
        threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        append_docs(rows, f"{threads}python benchmarks/bench_continuous.py "
                    + " ".join(sys.argv[1:] if argv is None else argv), device_name)
    return rows


if __name__ == "__main__":
    main()
