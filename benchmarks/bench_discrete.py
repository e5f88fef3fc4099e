"""Speed of the discrete backbone: training steps/s and sampling latency (random weights).

For each transformer preset: (1) training steps (VLB + auxiliary loss, backward, AdamW) on one fixed
batch of random token maps and conditions, and (2) the latency of sampling a batch of token maps
with guidance (cond + null in one batched forward per step) over ``--sample-steps`` reverse steps,
at each ``--sample-batch``. VQ decoding is not included (one decoder pass, milliseconds). Each
timing repeats until ``--min-seconds`` after warm-up. Prints a table and JSON lines; ``--json``
writes them, ``--append-docs`` appends the table to docs/benchmarks.md.

    OMP_NUM_THREADS=1 python benchmarks/bench_discrete.py --presets tiny 35M --append-docs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from knn_diffusion.models.config import ConditioningConfig
from knn_diffusion.models.discrete.config import (
    DiscreteConfig,
    DiscreteTrainConfig,
    TransitionConfig,
    load_transformer_preset,
)
from knn_diffusion.models.discrete.diffusion import DiscreteDiffusion
from knn_diffusion.models.discrete.sampler import sample_tokens
from knn_diffusion.models.discrete.training import discrete_loss
from knn_diffusion.training.config import Precision
from knn_diffusion.training.loop import autocast_dtype, optimizer_step

from timing import call_times, cuda_sync, median  # benchmarks/timing.py, beside this script

REPO = Path(__file__).resolve().parents[1]


def timed(fn, warmup: int, min_seconds: float, min_runs: int, device: torch.device) -> float:
    """Median seconds per call of ``fn()`` after ``warmup`` calls, repeating until both minimums are reached."""
    return median(call_times(lambda i: fn(), warmup=warmup, min_runs=min_runs, min_seconds=min_seconds,
                             sync=cuda_sync(device)))


def bench_preset(preset: str, args, device: torch.device) -> dict:
    config = DiscreteConfig(transformer=load_transformer_preset(preset, args.codes, args.side, args.side),
                            conditioning=ConditioningConfig(embed_dim=args.dim, k=args.k),
                            transition=TransitionConfig(steps=args.transition_steps))
    torch.manual_seed(0)
    model = DiscreteDiffusion(config).to(device)
    amp = autocast_dtype(Precision(args.precision), device)
    row = {"preset": preset, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "tokens": f"{args.side}x{args.side}", "codes": args.codes, "device": device.type,
           "precision": "fp32" if amp is None else str(amp).removeprefix("torch.")}
    if not args.sampling_only:
        cfg = DiscreteTrainConfig(batch_size=args.batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, args.codes, (args.batch_size, args.side * args.side), device=device)
        cond = torch.randn(args.batch_size, 1 + args.k, args.dim, device=device)
        counter = iter(range(10 ** 9))

        def train_step() -> None:
            loss, _ = discrete_loss(model, model, tokens, cond, torch.Generator().manual_seed(next(counter)), cfg, amp)
            optimizer_step(loss, model, optimizer, None, 1.0)

        seconds = timed(train_step, args.warmup, args.min_seconds, args.min_runs, device)
        row.update(train_batch=args.batch_size, train_steps_per_s=round(1 / seconds, 3),
                   train_tokens_per_s=round(args.batch_size * args.side ** 2 / seconds))
    model.eval()
    for batch in args.sample_batch:
        cond = torch.randn(batch, 1 + args.k, args.dim, device=device)
        seconds = timed(lambda: sample_tokens(model, cond, guidance=args.guidance, steps=args.sample_steps,
                                              truncation=args.truncation, seeds=list(range(batch)),
                                              autocast_dtype=amp),
                        1, args.min_seconds, 2, device)
        row[f"sample_s_batch{batch}"] = round(seconds, 3)
    row["sample_steps"] = args.sample_steps
    return row


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--side", type=int, default=8, help="token map side (paper: 32)")
    parser.add_argument("--codes", type=int, default=256, help="vocabulary after remapping (paper: 2887)")
    parser.add_argument("--dim", type=int, default=256, help="embedding size d (paper: 512)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="training batch")
    parser.add_argument("--transition-steps", type=int, default=100, help="N")
    parser.add_argument("--sample-steps", type=int, default=100)
    parser.add_argument("--sample-batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--guidance", type=float, default=8.0)
    parser.add_argument("--truncation", type=float, default=0.9)
    parser.add_argument("--precision", default="auto", choices=[p.value for p in Precision])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-runs", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--sampling-only", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--append-docs", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for preset in args.presets:
        rows.append(bench_preset(preset, args, device))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.append_docs:
        where = (torch.cuda.get_device_name() if device.type == "cuda"
                 else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
                      f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        command = "python benchmarks/bench_discrete.py " + " ".join(argv if argv is not None else os.sys.argv[1:])
        with open(REPO / "docs" / "benchmarks.md", "a") as fh:
            fh.write(f"\n### Discrete backbone ({where})\n\n`{command}`\n\n{table(rows)}\n")
    return rows


if __name__ == "__main__":
    main()
