"""Ablation sweeps: one DVC experiment per parameter combination, run by DVC's experiment queue.

Each combination is queued with ``dvc exp run --queue -n <name> -S key=value ...``; ``dvc queue start
-j N`` then runs N at a time, each in its own copy of the workspace, all sharing the DVC cache. DVC
versions every experiment (``dvc exp show``, ``dvc exp apply``); Prefect records the sweep, one task per
step, and fails the flow run when any experiment fails (with that experiment's log tail).

Every stage logs to one MLflow store: an exported ``MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri``
in params.yaml, else this repo's ``mlflow.db`` - pinned for the queued runs, whose working copies live
under ``.dvc/tmp``. The store and the experiment are created once, before the runs start (concurrent
first use of a sqlite store races on its schema). Rerunning a sweep replaces the experiments of the
same names; unchanged stages come back from DVC's run cache. A stage's MLflow run is tagged with its
experiment's name (``pipeline_run``, from DVC's ``DVC_EXP_NAME``).

    python -m flows.sweep retrieval.index_fraction=0.1,0.3,0.5,0.7,1.0
    python -m flows.sweep train_continuous.variant=tokens,no_knn --parallel 2
    python -m flows.sweep train_continuous.k=1,5,10 sample.continuous.guidance=1,3
    python -m flows.sweep train_continuous.k=1,10 + train_continuous.variant=no_knn   # 2 trials + 1
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import stage_env
from knn_diffusion.config import ConfigError, load_params
from knn_diffusion.tracking import TRIAL_RUNS_ENV, git_commit, group_run, tracking_uri, with_retries

POLL_SECONDS = 3
FINISHED = {"Success", "Failed"}


GRID_SEPARATOR = "+"


def expand_grid(axes: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x'] -> [['a=1', 'b=x'], ['a=2', 'b=x']] (the cartesian product). A '+' between axes
    starts another grid, whose trials are added: ['a=1,2', '+', 'b=y'] -> [['a=1'], ['a=2'], ['b=y']]."""
    grids: list[list[list[str]]] = [[]]
    for axis in axes:
        if axis == GRID_SEPARATOR:
            grids.append([])
            continue
        if "=" not in axis:
            raise ValueError(f"sweep axis {axis!r}: expected key=value1,value2,... or '{GRID_SEPARATOR}'")
        key, values = axis.split("=", 1)
        grids[-1].append([f"{key}={value}" for value in values.split(",")])
    if not all(grids):
        raise ValueError(f"sweep axes {axes}: '{GRID_SEPARATOR}' must stand between two grids")
    combos = [list(combo) for grid in grids for combo in itertools.product(*grid)]
    return list({tuple(combo): combo for combo in combos}.values())  # a trial listed twice runs once


def experiment_name(prefix: str, overrides: list[str]) -> str:
    body = "-".join(o.split(".")[-1] for o in overrides)
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{prefix}-{body}")[:90]


def sweep_tracking_uri(repo: Path) -> str:
    """The store every queued stage logs to: exported URI, then params' tracking.tracking_uri, then the repo's."""
    configured = load_params(repo / "params.yaml").tracking.tracking_uri
    return tracking_uri(configured, root=repo)


def _dvc(repo: Path, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env,
                          capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done


def queue_status(repo: Path, env: dict[str, str]) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from ``dvc queue status``."""
    rows = _dvc(repo, env, "queue", "status").stdout.splitlines()
    status = {}
    for row in rows[1:]:
        fields = row.split()
        if len(fields) >= 4 and not row.startswith("Worker"):
            status[fields[1]] = fields[-1]
    return status


@task(cache_policy=NO_CACHE)
def prepare_store(uri: str, experiment: str) -> str:
    """Create the MLflow store's schema and the experiment once, before runs write to it concurrently."""
    import mlflow

    from knn_diffusion.tracking import experiment_id_for

    mlflow.set_tracking_uri(uri)
    return with_retries(lambda: experiment_id_for(experiment))


@task(cache_policy=NO_CACHE, task_run_name="queue {name}")
def queue_experiment(repo: Path, env: dict[str, str], name: str, overrides: list[str]) -> str:
    """Queue one combination; an experiment (or finished queue task) of the same name is replaced."""
    logger = get_run_logger()
    if name in _dvc(repo, env, "exp", "list", "--name-only").stdout.split():
        logger.info("replacing the existing experiment '%s'", name)
        _dvc(repo, env, "exp", "remove", name)
    _dvc(repo, env, "queue", "remove", name, check=False)  # a finished task of an earlier sweep
    _dvc(repo, env, "exp", "run", "--queue", "-n", name, *itertools.chain.from_iterable(("-S", o) for o in overrides))
    return name


@task(cache_policy=NO_CACHE)
def run_queue(repo: Path, env: dict[str, str], names: list[str], jobs: int) -> dict[str, str]:
    """Start ``jobs`` queue workers and wait until every experiment in ``names`` has finished."""
    logger = get_run_logger()
    _dvc(repo, env, "queue", "start", "-j", str(jobs))
    reported: dict[str, str] = {}
    while True:
        status = queue_status(repo, env)
        for name in names:
            if status.get(name) != reported.get(name):
                logger.info("%s: %s", name, status.get(name, "?"))
        reported = {name: status.get(name, "?") for name in names}
        if all(state in FINISHED for state in reported.values()):
            return reported
        if not any(state in ("Queued", "Running") for state in reported.values()):
            raise RuntimeError(f"experiments neither queued, running nor finished: {reported}")
        time.sleep(POLL_SECONDS)


@task(cache_policy=NO_CACHE)
def write_sweep_report(repo: Path, uri: str, experiment: str, names: list[str], prefix: str, run_id: str) -> str:
    """The ablation tables and plots over this sweep's experiments, logged to the sweep's parent run."""
    from knn_diffusion.evaluation.report import publish_report

    out = repo / "outputs" / "report" / prefix
    try:
        publish_report(experiment, out, pipeline_runs=names, tracking_uri=uri, run_id=run_id)
    except ValueError as err:  # no evaluate runs, or mixed FID features: the experiments themselves succeeded
        get_run_logger().warning("no ablation report: %s", err)
        return ""
    get_run_logger().info("ablation report: %s", out / "tables.md")
    return str(out / "tables.md")


@flow(name="knn-diffusion-sweep")
def sweep(axes: list[str], repo: str = ".", prefix: str = "sweep", parallel: int = 1, retries: int = 1) -> list[str]:
    """Run one DVC experiment per combination of ``axes``, ``parallel`` at once; a failed experiment is
    queued again up to ``retries`` times; the flow fails if any still fails.

    MLflow: one parent run for the sweep, one child per trial carrying all of that trial's params
    (flattened, so the compare view lines up k / index fraction / variant / size with the metrics),
    and the trial's stage runs under it. It ends with the ablation report over the trials' evaluate
    runs (``outputs/report/<prefix>/``, also logged to the parent run).
    """
    from prefect.runtime import flow_run

    repo_path = Path(repo).resolve()
    combos = expand_grid(axes)
    trial_params = [load_params(repo_path / "params.yaml", combo) for combo in combos]  # bad values fail here
    names = [experiment_name(prefix, combo) for combo in combos]
    uri = sweep_tracking_uri(repo_path)
    experiment = trial_params[0].tracking.experiment
    prepare_store(uri, experiment)
    tags = {"git.commit": git_commit(repo_path)[0], "prefect.flow_run_url": flow_run.ui_url or ""}
    with group_run(f"sweep {prefix}", experiment, uri, params={"axes": axes}, tags={**tags, "kind": "sweep"}) as parent:
        with contextlib.ExitStack() as stack:  # the trials end (FINISHED or FAILED) before the sweep does
            trials = {name: stack.enter_context(group_run(name, experiment, uri, params=params, parent=parent.id,
                                                          tags={**tags, "kind": "trial", "dvc.experiment": name}))
                      for name, params in zip(names, trial_params)}
            env = {**stage_env({TRIAL_RUNS_ENV: json.dumps({name: run.id for name, run in trials.items()})}),
                   "MLFLOW_TRACKING_URI": uri}
            pending = dict(zip(names, combos))
            for attempt in range(retries + 1):
                for name, combo in pending.items():
                    queue_experiment(repo_path, env, name, combo)
                states = run_queue(repo_path, env, list(pending), parallel)
                pending = {name: pending[name] for name, state in states.items() if state != "Success"}
                if not pending:
                    write_sweep_report(repo_path, uri, experiment, names, prefix, parent.id)
                    return names
                get_run_logger().warning("failed (attempt %d of %d): %s", attempt + 1, retries + 1, sorted(pending))
            for name in pending:
                trials[name].fail(f"experiment failed {retries + 1} times")
        logs = {name: _dvc(repo_path, env, "queue", "logs", name, check=False).stdout[-3000:] for name in pending}
        parent.fail(f"trials failed: {sorted(pending)}")
        raise RuntimeError(f"experiments failed: {sorted(pending)}\n" +
                           "\n".join(f"--- {n}:\n{t}" for n, t in logs.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("axes", nargs="+", help="key=value1,value2 (one axis each; the grid is their product); "
                        "'+' between axes adds another grid's trials")
    parser.add_argument("--repo", default=".")
    parser.add_argument("--prefix", default="sweep", help="experiment name prefix")
    parser.add_argument("--parallel", type=int, default=1, help="experiments at once (each is a full pipeline)")
    args = parser.parse_args(argv)
    try:
        names = sweep(axes=args.axes, repo=args.repo, prefix=args.prefix, parallel=args.parallel)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    print("experiments:", ", ".join(names), "\ncompare: dvc exp show  |  mlflow ui --backend-store-uri",
          sweep_tracking_uri(Path(args.repo).resolve()))


if __name__ == "__main__":
    main()
