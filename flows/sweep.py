"""Ablation sweeps: one DVC experiment per parameter combination, run by DVC's experiment queue.

Each combination is queued with ``dvc exp run --queue -n <name> -S key=value ...``; ``dvc queue start
-j N`` then runs N at a time, each in its own copy of the workspace, all sharing the DVC cache. DVC
versions every experiment (``dvc exp show``, ``dvc exp apply``); Prefect records the sweep, one task per
step, and fails the flow run when any experiment fails (with that experiment's log tail).

Every stage logs to one MLflow store: an exported ``MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri``
in params.yaml, else this repo's ``mlflow.db`` - pinned for the queued runs, whose working copies live
under ``.dvc/tmp``. The store and the experiment are created once, before the runs start (concurrent
first use of a sqlite store races on its schema). A stage's MLflow run is tagged with its experiment's
name (``pipeline_run``, from DVC's ``DVC_EXP_NAME``).

Rerunning a sweep (same prefix, axes, git commit and uncommitted changes) resumes it: its MLflow parent run is reopened, a
trial whose DVC experiment succeeded with the same params and whose trial run FINISHED is "already done",
and only the others run (their trial runs reopened; queue tasks the dead sweep left "Running" are killed
and their working copies removed). ``--fresh`` runs every trial again under a new parent, replacing the
experiments of the same names; unchanged stages then come back from DVC's run cache.

    python -m flows.sweep retrieval.index_fraction=0.1,0.3,0.5,0.7,1.0
    python -m flows.sweep train_continuous.variant=tokens,no_knn --parallel 2
    python -m flows.sweep train_continuous.k=1,5,10 sample.continuous.guidance=1,3
    python -m flows.sweep train_continuous.k=1,10 + train_continuous.variant=no_knn   # 2 trials + 1
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import stage_env
from knn_diffusion.config import ConfigError, flatten, load_params
from knn_diffusion.tracking import (TRIAL_RUNS_ENV, end_stale_descendants, git_commit, group_run, tracking_uri,
                                    with_retries)

POLL_SECONDS = 3
SWEEP_IDENTITY = ("sweep.prefix", "sweep.axes", "sweep.workspace")  # with git.commit: what a rerun must match
FINISHED = {"Success", "Failed"}


GRID_SEPARATOR = "+"


class SweepBusy(RuntimeError):
    """The sweep, or one of its experiments, is being run by a live process: resuming it would run it twice."""


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


def trials_of(axes: list[str], repo: Path, prefix: str) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """({experiment name: overrides}, {experiment name: its validated params}); bad axes or values raise."""
    grid = expand_grid(axes)
    combos = {experiment_name(prefix, combo): combo for combo in grid}
    if len(combos) < len(grid):
        raise ValueError(f"sweep axes {axes}: two trials get the same experiment name (names keep only each "
                         f"key's last part): {sorted(combos)}")
    return combos, {name: load_params(repo / "params.yaml", combo) for name, combo in combos.items()}


def sweep_tracking_uri(repo: Path) -> str:
    """The store every queued stage logs to: exported URI, then params' tracking.tracking_uri, then the repo's."""
    configured = load_params(repo / "params.yaml").tracking.tracking_uri
    return tracking_uri(configured, root=repo)


def _dvc(repo: Path, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # Output through files, not pipes: the queue workers `dvc queue start` leaves running inherit them, and
    # reading a pipe to its end would wait for those workers to exit (for the whole queue).
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env, stdout=out,
                              stderr=err).returncode
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(args, code, out.read(), err.read())
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


def workspace_changes(repo: Path) -> str:
    """A hash of the uncommitted changes to tracked files (queued experiments run with them), '' when clean."""
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=repo, capture_output=True, check=True).stdout
    return hashlib.sha256(diff).hexdigest()[:16] if diff else ""


def process_tag() -> str:
    """This process as ``host:pid:start time`` (a pid alone may be reused), to tell a live sweep from a dead one."""
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{int(me.create_time())}"


def process_alive(tag: str) -> bool:
    """Whether the process of a :func:`process_tag` still runs; one on another host counts as gone."""
    host, pid, started = (tag.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        return int(psutil.Process(int(pid)).create_time()) == int(started or 0)
    except psutil.Error:
        return False


def pid_alive(pid: int | None) -> bool:
    try:
        return bool(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def dvc_experiments(repo: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """What DVC knows of the experiments of HEAD, by name (``dvc exp show``, ``dvc exp list``).

    ``succeeded``: an experiment of that name is committed (its results are in ``dvc exp show``);
    ``params``: its params.yaml; ``deps``: {path: DVC hash} of its stages' deps; ``running``: the pid and
    working copy of a queue task of that name that DVC reports as running (its worker may have died with
    a killed sweep: DVC keeps saying "Running" until ``dvc queue kill``).
    """
    head = git_commit(repo)[0]
    committed = set(_dvc(repo, env, "exp", "list", "--name-only").stdout.split())
    found: dict[str, dict[str, Any]] = {}
    for entry in json.loads(_dvc(repo, env, "exp", "show", "--json").stdout or "[]"):
        if entry.get("rev") != head:
            continue
        for exp in entry.get("experiments") or []:
            executor = exp.get("executor") or {}
            info = found.setdefault(exp["name"], {"succeeded": exp["name"] in committed, "running": None})
            if executor.get("state") == "running":
                local = executor.get("local") or {}
                info["running"] = {"pid": local.get("pid"), "root": local.get("root")}
            elif exp["name"] in committed and executor.get("state") in (None, "success"):
                data = exp["revs"][0]["data"]
                info["params"] = ((data.get("params") or {}).get("params.yaml") or {}).get("data", {})
                info["deps"] = {path: dep["hash"] for path, dep in (data.get("deps") or {}).items() if dep.get("hash")}
    return found


def trial_params_file(repo: Path, overrides: list[str]) -> dict:
    """params.yaml as a queued experiment with ``overrides`` gets it (values parsed as YAML, like ``-S``)."""
    params = yaml.safe_load((repo / "params.yaml").read_text()) or {}
    for override in overrides:
        key, value = override.split("=", 1)
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return params


def earlier_sweep(client: Any, experiment_id: str, tags: dict[str, str]) -> Any | None:
    """The latest parent run of this same sweep (prefix, axes, git commit and uncommitted changes), unless
    its process still runs."""
    runs = with_retries(lambda: client.search_runs(
        [experiment_id], f"tags.kind = 'sweep' and tags.`git.commit` = '{tags['git.commit']}'",
        order_by=["attributes.start_time DESC"], max_results=1000))
    same = [r for r in runs if all(r.data.tags.get(k, "") == tags[k] for k in SWEEP_IDENTITY)]
    if not same:
        return None
    latest = same[0]
    if latest.info.status == "RUNNING" and process_alive(latest.data.tags.get("sweep.process", "")):
        raise SweepBusy(f"sweep '{tags['sweep.prefix']}' is still running (process "
                           f"{latest.data.tags['sweep.process']}, MLflow run {latest.info.run_id}): wait for it to end")
    return latest


def trial_runs(client: Any, experiment_id: str, parent_id: str) -> dict[str, Any]:
    """{DVC experiment name: its latest trial run} under a sweep's parent run."""
    runs = with_retries(lambda: client.search_runs(
        [experiment_id], f"tags.kind = 'trial' and tags.`mlflow.parentRunId` = '{parent_id}'",
        order_by=["attributes.start_time ASC"], max_results=50_000))
    return {run.data.tags.get("dvc.experiment", run.info.run_name): run for run in runs}


def plan_trials(repo: Path, env: dict[str, str], combos: dict[str, list[str]], previous: dict[str, Any]
                ) -> tuple[list[str], list[str], dict[str, dict]]:
    """Split the trials into (already done, still running in a live queue worker, to run), the last with
    the dead queue task each leaves behind (or None).

    Done: its experiment succeeded from this commit with the same params, and its trial run FINISHED (or
    is still RUNNING: the sweep died before it saw the experiment end).
    """
    known = dvc_experiments(repo, env)
    done, live, to_run = [], [], {}
    for name, overrides in combos.items():
        info = known.get(name, {})
        running = info.get("running")
        if running and pid_alive(running["pid"]) and name in previous:
            live.append(name)
        elif (info.get("succeeded") and not running and info.get("params") == trial_params_file(repo, overrides)
              and name in previous and previous[name].info.status in ("FINISHED", "RUNNING")):
            done.append(name)
        elif running and pid_alive(running["pid"]):
            raise SweepBusy(f"experiment '{name}' is being run by another process (pid {running['pid']}): "
                               f"wait for it, or stop it with `dvc queue kill {name}`")
        else:
            to_run[name] = running
    return done, live, to_run


def stop_dead_task(repo: Path, env: dict[str, str], name: str, dead: dict) -> None:
    """A task DVC reports "Running" whose process is gone: ``dvc queue kill`` (DVC marks it failed), and its
    working copy under .dvc/tmp/exps removed."""
    _dvc(repo, env, "queue", "kill", name, check=False)
    root = Path(dead["root"] or repo).resolve()
    if root.is_relative_to((repo / ".dvc" / "tmp" / "exps").resolve()):
        shutil.rmtree(root, ignore_errors=True)


@task(cache_policy=NO_CACHE)
def prepare_store(uri: str, experiment: str) -> str:
    """Create the MLflow store's schema and the experiment once, before runs write to it concurrently."""
    import mlflow

    from knn_diffusion.tracking import experiment_id_for

    mlflow.set_tracking_uri(uri)
    return with_retries(lambda: experiment_id_for(experiment))


@task(cache_policy=NO_CACHE, task_run_name="queue {name}")
def queue_experiment(repo: Path, env: dict[str, str], name: str, overrides: list[str], dead: dict | None = None
                     ) -> str:
    """Queue one combination; an experiment (or finished queue task) of the same name is replaced, and a
    ``dead`` task of that name (its worker died with a killed sweep) is killed and its working copy removed."""
    logger = get_run_logger()
    if dead:
        logger.info("'%s' was left running by a dead worker (pid %s): dvc queue kill", name, dead["pid"])
        stop_dead_task(repo, env, name, dead)
    if name in _dvc(repo, env, "exp", "list", "--name-only").stdout.split():
        logger.info("replacing the existing experiment '%s'", name)
        _dvc(repo, env, "exp", "remove", name)
    _dvc(repo, env, "queue", "remove", name, check=False)  # a finished task of an earlier sweep
    _dvc(repo, env, "exp", "run", "--queue", "-n", name, *itertools.chain.from_iterable(("-S", o) for o in overrides))
    return name


@task(cache_policy=NO_CACHE)
def run_queue(repo: Path, env: dict[str, str], names: list[str], jobs: int,
              on_success: Callable[[str], None] = lambda name: None) -> dict[str, str]:
    """Start ``jobs`` queue workers and wait until every experiment in ``names`` has finished; ``on_success``
    is called with each experiment's name as soon as it has succeeded. A task whose process died (its
    worker killed) fails, and workers are started again, so a lost worker never leaves the sweep waiting."""
    logger = get_run_logger()
    _dvc(repo, env, "queue", "start", "-j", str(jobs))
    reported: dict[str, str] = {}
    polls = 0
    while True:
        polls += 1
        if polls % 10 == 0 and "Running" in reported.values():  # about every 30 s
            known = dvc_experiments(repo, env)
            for name in [n for n, state in reported.items() if state == "Running"]:
                running = known.get(name, {}).get("running")
                if running and not pid_alive(running["pid"]):
                    logger.warning("%s: its process (pid %s) died", name, running["pid"])
                    stop_dead_task(repo, env, name, running)
                    _dvc(repo, env, "queue", "start", "-j", str(jobs))
        status = queue_status(repo, env)
        for name in names:
            if status.get(name) != reported.get(name):
                logger.info("%s: %s", name, status.get(name, "?"))
                if status.get(name) == "Success":
                    on_success(name)
        reported = {name: status.get(name, "?") for name in names}
        if all(state in FINISHED for state in reported.values()):
            return reported
        if not any(state in ("Queued", "Running") for state in reported.values()):
            raise RuntimeError(f"experiments neither queued, running nor finished: {reported}")
        time.sleep(POLL_SECONDS)


@task(cache_policy=NO_CACHE)
def write_sweep_report(repo: Path, uri: str, experiment: str, names: list[str], prefix: str, run_id: str,
                       inputs: dict[str, dict] | None = None) -> str:
    """The ablation tables and plots over this sweep's experiments, logged to the sweep's parent run.

    ``inputs`` ({experiment: {"deps", "params"}}, from DVC) let the report find the earlier evaluate run
    whose outputs DVC restored from its run cache for a trial that logged none itself.
    """
    from knn_diffusion.evaluation.report import publish_report

    out = repo / "outputs" / "report" / prefix
    try:
        publish_report(experiment, out, pipeline_runs=names, tracking_uri=uri, run_id=run_id, restored=inputs)
    except ValueError as err:  # no evaluate runs, or mixed FID features: the experiments themselves succeeded
        get_run_logger().warning("no ablation report: %s", err)
        return ""
    get_run_logger().info("ablation report: %s", out / "tables.md")
    return str(out / "tables.md")


@flow(name="knn-diffusion-sweep")
def sweep(axes: list[str], repo: str = ".", prefix: str = "sweep", parallel: int = 1, retries: int = 1,
          fresh: bool = False) -> list[str]:
    """Run one DVC experiment per combination of ``axes``, ``parallel`` at once; a failed experiment is
    queued again up to ``retries`` times; the flow fails if any still fails.

    MLflow: one parent run for the sweep, one child per trial carrying all of that trial's params
    (flattened, so the compare view lines up k / index fraction / variant / size with the metrics),
    and the trial's stage runs under it. It ends with the ablation report over the trials' evaluate
    runs (``outputs/report/<prefix>/``, also logged to the parent run).

    A rerun of the same sweep (prefix, axes, git commit, uncommitted changes) resumes the latest one: the same parent run,
    trials already done are not queued again, the others run under their earlier trial runs; trials
    a live queue worker of the dead sweep still runs are waited for. ``fresh``: run every trial again.
    """
    from mlflow import MlflowClient
    from prefect.runtime import flow_run

    logger = get_run_logger()
    repo_path = Path(repo).resolve()
    combos, trial_params = trials_of(axes, repo_path, prefix)
    names = list(combos)
    uri = sweep_tracking_uri(repo_path)
    experiment = next(iter(trial_params.values())).tracking.experiment
    experiment_id = prepare_store(uri, experiment)
    client = MlflowClient(uri)
    tags = {"git.commit": git_commit(repo_path)[0], "prefect.flow_run_url": flow_run.ui_url or ""}
    sweep_tags = {**tags, "kind": "sweep", "sweep.prefix": prefix, "sweep.axes": json.dumps(axes),
                  "sweep.workspace": workspace_changes(repo_path), "sweep.process": process_tag()}
    earlier = earlier_sweep(client, experiment_id, sweep_tags)
    if earlier is not None and fresh:
        logger.info("fresh: not resuming the earlier sweep run %s", earlier.info.run_id)
        earlier = None
    previous = trial_runs(client, experiment_id, earlier.info.run_id) if earlier else {}
    env = {**stage_env(), "MLFLOW_TRACKING_URI": uri}
    done, live, dead = plan_trials(repo_path, env, combos, previous)
    if earlier is not None:
        logger.info("resuming sweep run %s (%s): %d of %d trials already done", earlier.info.run_id,
                    earlier.info.status, len(done), len(names))
    for name in done:
        logger.info("%s: already done (DVC experiment committed, MLflow trial run %s)", name,
                    previous[name].info.run_id)
        if previous[name].info.status == "RUNNING":  # its experiment ended after the sweep died
            end_stale_descendants(client, experiment_id, previous[name].info.run_id)
            with_retries(lambda run_id=previous[name].info.run_id: client.set_terminated(run_id, "FINISHED"))
    for name in live:
        logger.info("%s: still running in a queue worker of the earlier sweep: waiting for it", name)
    with group_run(f"sweep {prefix}", experiment, uri, params={"axes": axes}, tags=sweep_tags,
                   resume=earlier.info.run_id if earlier else None) as parent:
        with contextlib.ExitStack() as stack:  # the trials end (FINISHED or FAILED) before the sweep does
            trials = {}
            for name in [n for n in names if n not in done]:
                old = previous.get(name)
                if old is not None and name not in live:
                    end_stale_descendants(client, experiment_id, old.info.run_id)  # stage runs of the dead sweep
                trials[name] = stack.enter_context(group_run(
                    name, experiment, uri, params=trial_params[name], parent=parent.id,
                    tags={**tags, "kind": "trial", "dvc.experiment": name},
                    resume=old.info.run_id if old is not None else None))
            run_ids = {**{name: previous[name].info.run_id for name in done}, **{n: r.id for n, r in trials.items()}}
            env[TRIAL_RUNS_ENV] = json.dumps(run_ids)
            pending = {name: combos[name] for name in trials}
            for attempt in range(retries + 1):
                for name, combo in pending.items():
                    if attempt > 0 or name not in live:
                        queue_experiment(repo_path, env, name, combo, dead.get(name) if attempt == 0 else None)
                states = run_queue(repo_path, env, list(pending), parallel,  # a trial ends as its experiment does
                                   lambda name: trials[name].finish()) if pending else {}
                pending = {name: pending[name] for name, state in states.items() if state != "Success"}
                if not pending:
                    inputs = {name: {"deps": info.get("deps", {}), "params": flatten(info.get("params", {}))}
                              for name, info in dvc_experiments(repo_path, env).items() if name in combos}
                    write_sweep_report(repo_path, uri, experiment, names, prefix, parent.id, inputs)
                    return names
                logger.warning("failed (attempt %d of %d): %s", attempt + 1, retries + 1, sorted(pending))
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
    parser.add_argument("--fresh", action="store_true",
                        help="run every trial again under a new MLflow parent run, instead of resuming the "
                        "earlier run of this sweep (same prefix, axes and git commit) and skipping its done trials")
    args = parser.parse_args(argv)
    try:
        trials_of(args.axes, Path(args.repo).resolve(), args.prefix)  # bad input: one line, before any flow run
        names = sweep(axes=args.axes, repo=args.repo, prefix=args.prefix, parallel=args.parallel, fresh=args.fresh)
    except (ConfigError, ValueError, SweepBusy) as err:  # bad axes or values; a sweep already running
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("experiments:", ", ".join(names), "\ncompare: dvc exp show  |  mlflow ui --backend-store-uri",
          sweep_tracking_uri(Path(args.repo).resolve()))


if __name__ == "__main__":
    main()
