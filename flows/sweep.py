"""Ablation sweeps: one DVC experiment per parameter combination, scheduled by Prefect.

Each combination runs as ``dvc exp run --temp -n <name> -S key=value ...`` in its own temporary copy of
the workspace, so DVC caches and versions every experiment (``dvc exp show``, ``dvc exp apply``) and
Prefect schedules them (``--parallel N`` at once, retries, a record per experiment). Every stage's
MLflow run lands in this repo's store and is tagged with the experiment's Prefect task run.

    python -m flows.sweep index.subset_fraction=0.1,0.3,0.5,0.7,1.0          # the index-size ablation
    python -m flows.sweep train_continuous.variant=tokens,no_knn --parallel 1
    python -m flows.sweep train_continuous.k=1,5,10 sample.guidance=1,3
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import stage_env
from knn_diffusion.config import ConfigError, load_params
from knn_diffusion.tracking import tracking_uri


def expand_grid(axes: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x'] -> [['a=1', 'b=x'], ['a=2', 'b=x']] (the cartesian product)."""
    parsed = []
    for axis in axes:
        if "=" not in axis:
            raise ValueError(f"sweep axis {axis!r}: expected key=value1,value2,...")
        key, values = axis.split("=", 1)
        parsed.append([f"{key}={value}" for value in values.split(",")])
    return [list(combo) for combo in itertools.product(*parsed)]


def experiment_name(prefix: str, overrides: list[str]) -> str:
    body = "-".join(o.split(".")[-1] for o in overrides)
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{prefix}-{body}")[:90]


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, task_run_name="{name}")
def run_experiment(repo: str, name: str, overrides: list[str]) -> str:
    logger = get_run_logger()
    dvc = str(Path(sys.executable).parent / "dvc")
    cmd = [dvc, "exp", "run", "--temp", "-n", name, *itertools.chain.from_iterable(("-S", o) for o in overrides)]
    env = stage_env(pipeline_run=name)
    # Temporary workspaces live under .dvc/tmp: point every stage at this repo's tracking store.
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    logger.info("%s", " ".join(cmd[1:]))
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"experiment '{name}' failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return name


@flow(name="knn-diffusion-sweep")
def sweep(axes: list[str], repo: str = ".", prefix: str = "sweep") -> list[str]:
    """Run one DVC experiment per combination of ``axes``; fails if any experiment fails.

    Concurrency comes from the task runner (``main`` sets ``--parallel`` workers).
    """
    combos = expand_grid(axes)
    for combo in combos:  # refuse a bad value before anything runs
        load_params(Path(repo) / "params.yaml", combo)
    results = []
    for combo in combos:
        results.append(run_experiment.submit(str(Path(repo).resolve()), experiment_name(prefix, combo), combo))
    return [f.result() for f in results]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("axes", nargs="+", help="key=value1,value2 (one axis each; the grid is their product)")
    parser.add_argument("--repo", default=".")
    parser.add_argument("--prefix", default="sweep", help="experiment name prefix")
    parser.add_argument("--parallel", type=int, default=1, help="experiments at once (each is a full pipeline)")
    args = parser.parse_args(argv)
    try:
        names = sweep.with_options(task_runner=ThreadPoolTaskRunner(max_workers=args.parallel))(
            axes=args.axes, repo=args.repo, prefix=args.prefix)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    print("experiments:", ", ".join(names), "\ncompare: dvc exp show  |  mlflow ui --backend-store-uri",
          tracking_uri())


if __name__ == "__main__":
    main()
