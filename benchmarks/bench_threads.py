"""Threads per stage process: the tiny U-Net's training steps with 1 and 2 torch threads, alone and with a
second process side by side (as ``--parallel-stages 2`` / ``--parallel 2`` run them).

Each configuration runs ``--steps`` training steps in fresh processes (``OMP_NUM_THREADS`` set, as the
flows set it) and reports wall seconds; the baseline is one process with one thread, measured in the same
run. ``runtime.threads: 0`` gives each of N processes side by side cores / N threads.

    python benchmarks/bench_threads.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = (("1 process x 1 thread", 1, 1, ""), ("1 process x 2 threads", 1, 2, ""),
           ("2 processes x 1 thread", 2, 1, ""), ("2 processes x 2 threads", 2, 2, ""),
           ("1 process x 2 threads, passive wait", 1, 2, "PASSIVE"),
           ("2 processes x 2 threads, passive wait", 2, 2, "PASSIVE"))


def work(steps: int) -> None:
    """``steps`` training steps of the tiny preset on a fixed synthetic batch (what train_continuous does)."""
    import torch
    from diffusers import DDPMScheduler

    from knn_diffusion.models.continuous.config import ContinuousTrainConfig
    from knn_diffusion.models.continuous.training import denoiser_config, diffusion_loss
    from knn_diffusion.models.continuous.unet import ContinuousDenoiser
    from knn_diffusion.training.data import ConditionedImages
    from knn_diffusion.training.loop import optimizer_step, step_generator

    from bench_continuous import synthetic_store  # benchmarks/, beside this script

    cfg = ContinuousTrainConfig(preset="tiny", k=10, batch_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        images, embeddings, neighbours = synthetic_store(Path(tmp), 64, 32, 256, cfg.k)
        torch.manual_seed(0)
        config = denoiser_config(cfg, 32, 256)
        model = ContinuousDenoiser(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        noise = DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule.value)
        dataset = ConditionedImages(images, embeddings, np.arange(len(images)), neighbours, config.conditioning.k)
        batch, cond = dataset.__getitems__(list(range(cfg.batch_size)))
        for step in range(steps):
            loss = diffusion_loss(model, noise, batch, cond, step_generator(0, 0, step), 0.0, False, None)
            optimizer_step(loss, model, optimizer, None, cfg.grad_clip)


def measure(processes: int, threads: int, wait_policy: str, steps: int) -> float:
    """Wall seconds until ``processes`` workers of ``threads`` threads each have done ``steps`` steps;
    ``wait_policy``: OMP_WAIT_POLICY (PASSIVE: idle threads sleep instead of spinning), '' for OpenMP's default."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    cmd = [sys.executable, __file__, "--worker", "--steps", str(steps)]
    start = time.perf_counter()
    workers = [subprocess.Popen(cmd, cwd=REPO, env=env) for _ in range(processes)]
    if any(w.wait() for w in workers):
        raise RuntimeError("a worker failed")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        work(args.steps)
        return
    load = os.getloadavg()[0]
    seconds = {name: measure(processes, threads, policy, args.steps) for name, processes, threads, policy in CONFIGS}
    base = seconds[CONFIGS[0][0]]
    print(f"{args.steps} training steps per process, {os.cpu_count()} cores, load average {load:.1f} at start")
    print("| configuration | wall s | vs 1 process x 1 thread |\n|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.1f} | {value / base:.2f}x |")


if __name__ == "__main__":
    main()
