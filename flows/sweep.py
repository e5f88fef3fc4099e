"""Ablation sweeps: one DVC experiment per parameter combination, run by DVC's experiment queue.

Each combination is queued with ``dvc exp run --queue --pull -n <name> -S key=value ...``; ``dvc queue
start -j N`` then runs N at a time, each in its own copy of the workspace, all sharing the DVC cache, each
stage process with cores / N threads. DVC versions every experiment (``dvc exp show``, ``dvc exp apply``);
Prefect records the sweep, one task per step, and fails the flow run when any experiment fails (with that
experiment's log tail).

Every stage logs to one MLflow store: an exported ``MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri``
in params.yaml, else this repo's ``mlflow.db`` - pinned for the queued runs, whose working copies live
under ``.dvc/tmp``. The store and the experiment are created once, before the runs start (concurrent
first use of a sqlite store races on its schema). A stage's MLflow run is tagged with its experiment's
name (``pipeline_run``, from DVC's ``DVC_EXP_NAME``).

Rerunning a sweep (same prefix, axes, git commit and uncommitted changes) resumes it: its MLflow parent run
is reopened, trials already done are skipped (``flows.sweep_plan.plan_trials``), and only the others run
(their trial runs reopened; queue tasks the dead sweep left "Running" are killed and their working copies
removed). ``--fresh`` runs every trial again under a new parent, replacing the experiments of the same
names; unchanged stages then come back from DVC's run cache.

    python -m flows.sweep retrieval.index_fraction=0.1,0.3,0.5,0.7,1.0
    python -m flows.sweep train_continuous.variant=tokens,no_knn --parallel 2
    python -m flows.sweep train_continuous.k=1,5,10 sample.continuous.guidance=1.0,3.0
    python -m flows.sweep train_continuous.k=1,10 + train_continuous.variant=no_knn   # 2 trials + 1
    python -m flows.sweep --preset study          # the paper's ablations (flows/sweep_presets.py; make study)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger

from flows.dvc_cli import dvc, dvc_experiments, stage_env
from flows.liveness import pid_alive, process_tag
from flows.sweep_plan import GRID_SEPARATOR, SweepBusy, TrialPlan, plan_trials, trials_of
from flows.sweep_presets import PRESETS, SweepPreset
from flows.sweep_queue import queue_experiment, remote_for_experiments, run_queue
from flows.sweep_tracking import (
    earlier_sweep,
    prepare_store,
    sweep_tracking_uri,
    trial_runs,
    workspace_changes,
    write_sweep_report,
)
from knn_diffusion.config import ConfigError, flatten
from knn_diffusion.tracking import TRIAL_RUNS_ENV, GroupRun, end_stale_descendants, git_commit, group_run, with_retries


def _close_done_trials(client: Any, experiment_id: str, plan: TrialPlan, previous: dict[str, Any]) -> None:
    """A done trial whose run the dead sweep left RUNNING (its experiment ended after the sweep died) ends FINISHED."""
    for name in plan.done:
        run_id = previous[name].info.run_id
        get_run_logger().info("%s: already done (DVC experiment committed, MLflow trial run %s)", name, run_id)
        if previous[name].info.status == "RUNNING":
            end_stale_descendants(client, experiment_id, run_id)
            with_retries(lambda: client.set_terminated(run_id, "FINISHED"))
    for name in plan.live:
        get_run_logger().info("%s: still running in a queue worker of the earlier sweep: waiting for it", name)


def _run_trials(repo: Path, env: dict[str, str], combos: dict[str, list[str]], trials: dict[str, GroupRun],
                plan: TrialPlan, parallel: int, retries: int, pull: bool, targets: tuple[str, ...]) -> list[str]:
    """Queue the trials not done and run the queue, a failed one again up to ``retries`` times; returns the
    names of those that still fail. A trial run ends FINISHED as soon as its experiment succeeds."""
    pending = {name: combos[name] for name in trials}
    for attempt in range(retries + 1):
        for name, combo in pending.items():
            if attempt > 0 or name not in plan.live:
                queue_experiment(repo, env, name, combo, plan.to_run.get(name) if attempt == 0 else None, pull,
                                 targets)
        states = run_queue(repo, env, list(pending), parallel, lambda name: trials[name].finish()) if pending else {}
        pending = {name: pending[name] for name, state in states.items() if state != "Success"}
        if not pending:
            return []
        get_run_logger().warning("failed (attempt %d of %d): %s", attempt + 1, retries + 1, sorted(pending))
    return sorted(pending)


@flow(name="knn-diffusion-sweep")
def sweep(axes: list[str], repo: str = ".", prefix: str = "sweep", parallel: int = 1, retries: int = 1,
          fresh: bool = False, base: list[str] | None = None, targets: list[str] | None = None) -> list[str]:
    """Run one DVC experiment per combination of ``axes``, ``parallel`` at once; a failed experiment is
    queued again up to ``retries`` times; the flow fails if any still fails. ``base``: overrides every trial
    shares (not in the names); ``targets``: the stages each trial reproduces (default: all).

    MLflow: one parent run for the sweep, one child per trial carrying all of that trial's params
    (flattened, so the compare view lines up k / index fraction / variant / size with the metrics),
    and the trial's stage runs under it. It ends with the ablation report over the trials' evaluate
    runs (``outputs/report/<prefix>/``, also logged to the parent run).

    A rerun of the same sweep resumes the latest one: the same parent run, trials already done are not
    queued again, the others run under their earlier trial runs; trials a live queue worker of the dead
    sweep still runs are waited for. ``fresh``: run every trial again.
    """
    from mlflow import MlflowClient
    from prefect.runtime import flow_run

    logger = get_run_logger()
    repo_path = Path(repo).resolve()
    combos, trial_params = trials_of(axes, repo_path, prefix, base or ())
    names = list(combos)
    uri = sweep_tracking_uri(repo_path)
    experiment = next(iter(trial_params.values())).tracking.experiment
    experiment_id = prepare_store(uri, experiment)
    client = MlflowClient(uri)
    tags = {"git.commit": git_commit(repo_path)[0], "prefect.flow_run_url": flow_run.ui_url or ""}
    identity = {"axes": axes, "base": base, "targets": targets} if base or targets else axes
    sweep_tags = {**tags, "kind": "sweep", "sweep.prefix": prefix, "sweep.axes": json.dumps(identity),
                  "sweep.workspace": workspace_changes(repo_path), "sweep.process": process_tag()}
    earlier = earlier_sweep(client, experiment_id, sweep_tags)
    if earlier is not None and fresh:
        logger.info("fresh: not resuming the earlier sweep run %s", earlier.info.run_id)
        earlier = None
    previous = trial_runs(client, experiment_id, earlier.info.run_id) if earlier else {}
    env = {**stage_env(side_by_side=parallel), "MLFLOW_TRACKING_URI": uri}
    plan = plan_trials(combos, yaml.safe_load((repo_path / "params.yaml").read_text()) or {},
                       dvc_experiments(repo_path, env), {n: r.info.status for n, r in previous.items()}, pid_alive)
    if earlier is not None:
        logger.info("resuming sweep run %s (%s): %d of %d trials already done", earlier.info.run_id,
                    earlier.info.status, len(plan.done), len(names))
    _close_done_trials(client, experiment_id, plan, previous)
    remote = remote_for_experiments(repo_path, env)
    if remote:
        logger.info("trials pull what they lack from the DVC remote %s", remote)
    settings = {"axes": axes, "base": base or [], "targets": targets or []}
    with group_run(f"sweep {prefix}", experiment, uri, params=settings, tags=sweep_tags,
                   resume=earlier.info.run_id if earlier else None) as parent:
        with contextlib.ExitStack() as stack:  # the trials end (FINISHED or FAILED) before the sweep does
            trials = {}
            for name in [n for n in names if n not in plan.done]:
                old = previous.get(name)
                if old is not None and name not in plan.live:
                    end_stale_descendants(client, experiment_id, old.info.run_id)  # stage runs of the dead sweep
                trials[name] = stack.enter_context(group_run(
                    name, experiment, uri, params=trial_params[name], parent=parent.id,
                    tags={**tags, "kind": "trial", "dvc.experiment": name},
                    resume=old.info.run_id if old is not None else None))
            run_ids = {**{name: previous[name].info.run_id for name in plan.done},
                       **{name: run.id for name, run in trials.items()}}
            env[TRIAL_RUNS_ENV] = json.dumps(run_ids)
            failed = _run_trials(repo_path, env, combos, trials, plan, parallel, retries, bool(remote),
                                 tuple(targets or ()))
            if not failed:
                inputs = {name: {"deps": info.get("deps", {}), "params": flatten(info.get("params", {}))}
                          for name, info in dvc_experiments(repo_path, env).items() if name in combos}
                write_sweep_report(repo_path, uri, experiment, names, prefix, parent.id, inputs)
                return names
            for name in failed:
                trials[name].fail(f"experiment failed {retries + 1} times")
        logs = {name: dvc(repo_path, env, "queue", "logs", name, check=False).stdout[-3000:] for name in failed}
        parent.fail(f"trials failed: {failed}")
        raise RuntimeError(f"experiments failed: {failed}\n" + "\n".join(f"--- {n}:\n{t}" for n, t in logs.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("axes", nargs="*", help="key=value1,value2 (one axis each; the grid is their product; "
                        "a list value in brackets: key=[1,2],[3]); '+' between axes adds another grid's trials")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="a named sweep (flows/sweep_presets.py), e.g. study: the paper's ablations")
    parser.add_argument("--repo", default=".")
    parser.add_argument("--prefix", help="experiment name prefix (default: the preset's name, else sweep)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="experiments at once (each is a full pipeline; each stage gets cores / N threads)")
    parser.add_argument("--fresh", action="store_true",
                        help="run every trial again under a new MLflow parent run, instead of resuming the earlier "
                             "run of this sweep (same prefix, axes and git commit) and skipping its done trials")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset] if args.preset else SweepPreset((), ())
    axes = [*preset.axes(), *([GRID_SEPARATOR] if preset.trials and args.axes else []), *args.axes]
    prefix = args.prefix or args.preset or "sweep"
    if not axes:
        parser.error("give axes (key=value1,value2 ...) or --preset")
    try:
        trials_of(axes, Path(args.repo).resolve(), prefix, preset.base)  # bad input: one line, before any flow run
        names = sweep(axes=axes, repo=args.repo, prefix=prefix, parallel=args.parallel, fresh=args.fresh,
                      base=list(preset.base), targets=list(preset.targets))
    except (ConfigError, ValueError, SweepBusy) as err:  # bad axes or values; a sweep already running
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("experiments:", ", ".join(names), "\ncompare: dvc exp show  |  mlflow ui --backend-store-uri",
          sweep_tracking_uri(Path(args.repo).resolve()))

if __name__ == "__main__":
    main()
