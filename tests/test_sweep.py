"""Sweeps through DVC's experiment queue: parallel runs keep the DVC cache and the MLflow store intact,
a rerun with the same names succeeds, and runs log where the team's tracking settings say."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from prefect.logging import disable_run_logger

from flows.dvc_cli import stage_env
from flows.sweep import sweep
from flows.sweep_plan import expand_grid
from flows.sweep_queue import running_tasks
from flows.sweep_tracking import sweep_tracking_uri
from tests.conftest import REPO
from tests.test_pipeline_flow import DVC, harness, repo_copy  # noqa: F401 (fixtures)


def _commit(repo: Path) -> None:
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    spec["stages"] = {"ingest": spec["stages"]["ingest"]}  # the sweep machinery, not the whole pipeline
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"], cwd=repo, check=True)


def _cache_is_intact(repo: Path) -> int:
    """Every object in the DVC cache hashes to its own name; returns how many files were checked."""
    checked = 0
    for path in (repo / ".dvc" / "cache" / "files" / "md5").rglob("*"):
        if path.is_file() and not path.name.endswith(".dir"):
            assert hashlib.md5(path.read_bytes()).hexdigest() == path.parent.name + path.name, path
            checked += 1
    return checked


def test_a_failing_dvc_exp_show_postpones_the_dead_worker_check(tmp_path, monkeypatch):
    """CI saw ``dvc exp show`` fail reading a task's .run file as its worker deleted it: the sweep failed although
    every trial was fine. A DVC command that fails here (no DVC repo at all) must leave the check for later."""
    monkeypatch.setattr("flows.dvc_cli.SHOW_RETRY_SECONDS", 0.0)
    with disable_run_logger():
        assert running_tasks(tmp_path, stage_env(), {"s-k-1": "Running"}) == {}


def test_dvc_experiments_asks_again_when_a_read_races_a_worker(tmp_path, monkeypatch):
    """The first ``dvc exp show`` fails (as when a worker deletes a task's files under it); the second answers."""
    import flows.dvc_cli as dvc_cli

    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=tmp_path,
                   check=True)
    real, shows = dvc_cli.dvc, []

    def racing(repo, env, *args, **kwargs):
        if args[:2] == ("exp", "show"):
            shows.append(args)
            if len(shows) == 1:
                raise RuntimeError("dvc exp show --json failed (exit 255):\nERROR: unexpected error - No such file")
        return real(repo, env, *args, **kwargs)

    monkeypatch.setattr(dvc_cli, "dvc", racing)
    monkeypatch.setattr(dvc_cli, "SHOW_RETRY_SECONDS", 0.0)
    assert dvc_cli.dvc_experiments(tmp_path, stage_env()) == {}
    assert len(shows) == 2


def test_a_dvc_queue_status_that_never_answers_is_killed_and_asked_again(tmp_path, monkeypatch):
    """CI saw ``dvc queue status`` never answer after a queue worker had been killed, and the sweep waited on it
    until the test timed out. DVC cannot be made to hang on demand, so a script stands in for it: its first
    ``queue status`` hangs, the next ones answer as DVC does. The sweep kills the hung call and polls again."""
    import flows.dvc_cli as dvc_cli
    import flows.sweep_queue as sweep_queue

    stand_in = tmp_path / "dvc"
    stand_in.write_text(f"""#!/bin/sh
[ "$1 $2" = "queue status" ] || exit 0  # queue start
[ -e {tmp_path}/asked ] || {{ touch {tmp_path}/asked; exec sleep 60; }}
printf 'Task     Name   Created    Status\\n1a2b3c4  s-k-1  10:05 AM   Success\\n\\nWorker status: 0 active, 0 idle\\n'
""")
    stand_in.chmod(0o755)
    monkeypatch.setattr(dvc_cli, "DVC", str(stand_in))
    monkeypatch.setattr(sweep_queue, "STATUS_TIMEOUT_SECONDS", 1)
    succeeded: list[str] = []
    with disable_run_logger():
        assert sweep_queue.run_queue.fn(tmp_path, {}, ["s-k-1"], 1, succeeded.append) == {"s-k-1": "Success"}
    assert succeeded == ["s-k-1"] and (tmp_path / "asked").exists()


@pytest.mark.slow  # two queue workers, then a fresh rerun (~40 s)
def test_parallel_sweep_then_rerun_with_the_same_names(harness, repo_copy):  # noqa: F811
    assert expand_grid(["a=1,2", "b=x,y"]) == [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]
    _commit(repo_copy)
    names = sweep(axes=["data.resolution=16,24"], repo=str(repo_copy), prefix="res", parallel=2)
    assert names == ["res-resolution-16", "res-resolution-24"]
    # --fresh: every trial again, under a new parent (a plain rerun would find them all done)
    assert sweep(axes=["data.resolution=16,24"], repo=str(repo_copy), prefix="res", parallel=2, fresh=True) == names

    shown = subprocess.run([DVC, "exp", "show", "--json"], cwd=repo_copy, capture_output=True, text=True, check=True)
    for name in names:
        assert shown.stdout.count(f'"{name}"') >= 1
    assert _cache_is_intact(repo_copy) > 4
    for name, resolution in zip(names, ("16", "24")):
        runs = mlflow.search_runs(experiment_names=["knn-diffusion"], output_format="list",
                                  filter_string=f"tags.pipeline_run = '{name}'")
        assert [r.info.status for r in runs] == ["FINISHED"], name  # the rerun came from DVC's run cache
        assert runs[0].data.params["data.resolution"] == resolution
    parents = mlflow.search_runs(experiment_names=["knn-diffusion"], output_format="list",
                                 filter_string="tags.kind = 'sweep' and tags.`sweep.prefix` = 'res'")
    assert [p.info.status for p in parents] == ["FINISHED", "FINISHED"]
    for parent in parents:
        trials = mlflow.search_runs(experiment_names=["knn-diffusion"], output_format="list",
                                    filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted((t.info.run_name, t.info.status) for t in trials) == [(n, "FINISHED") for n in names]


def test_sweep_logs_to_the_exported_then_the_configured_store(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"tracking_uri": "http://mlflow.team:5000"}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://exported:5000")
    assert sweep_tracking_uri(tmp_path) == "http://exported:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert sweep_tracking_uri(tmp_path) == "http://mlflow.team:5000"
    (tmp_path / "params.yaml").write_text("{}\n")
    assert sweep_tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_sweep_refuses_bad_values_before_running(harness, repo_copy):  # noqa: F811
    state = sweep(axes=["data.resolution=16,2"], repo=str(repo_copy), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="data.resolution"):
        state.result()


def test_plus_adds_another_grids_trials():
    assert expand_grid(["train_continuous.k=1,10", "+", "train_continuous.variant=no_knn"]) == [
        ["train_continuous.k=1"], ["train_continuous.k=10"], ["train_continuous.variant=no_knn"]]
    assert expand_grid(["a=1,2", "+", "a=2,3"]) == [["a=1"], ["a=2"], ["a=3"]]  # a trial listed twice runs once
    for bad in (["+", "a=1"], ["a=1", "+"], ["a=1", "+", "+", "b=2"]):
        with pytest.raises(ValueError, match="must stand between two grids"):
            expand_grid(bad)


def test_a_sweep_whose_process_still_runs_is_not_resumed():
    from mlflow import MlflowClient

    from flows.liveness import process_tag
    from flows.sweep_plan import SweepBusy
    from flows.sweep_tracking import earlier_sweep

    client = MlflowClient()
    experiment = client.get_experiment_by_name("knn-diffusion") or client.create_experiment("knn-diffusion")
    experiment_id = getattr(experiment, "experiment_id", experiment)
    gone = subprocess.Popen(["true"])
    gone.wait()
    identity = {"kind": "sweep", "git.commit": "f" * 40, "sweep.prefix": "alive", "sweep.axes": '["k=1"]'}
    dead = client.create_run(experiment_id, tags={**identity, "sweep.process": f"{process_tag().split(':')[0]}:"
                                                  f"{gone.pid}:0"}).info.run_id
    lookup = {**identity, "sweep.workspace": ""}  # a clean checkout (the tag is left out when empty)
    assert earlier_sweep(client, experiment_id, lookup).info.run_id == dead  # its process died: resumed
    client.create_run(experiment_id, tags={**identity, "sweep.process": process_tag()})
    with pytest.raises(SweepBusy, match="sweep 'alive' is still running"):
        earlier_sweep(client, experiment_id, lookup)
    assert earlier_sweep(client, experiment_id, {**lookup, "sweep.axes": '["k=2"]'}) is None  # another sweep


def test_bad_axes_end_in_one_error_line_before_any_run(tmp_path, capsys):
    from flows.sweep import main
    from flows.sweep_plan import trials_of

    with pytest.raises(ValueError, match="two trials get the same experiment name"):
        trials_of(["train_continuous.k=1", "+", "train_discrete.k=1"], REPO, "s")  # both would be 's-k-1'
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    with pytest.raises(SystemExit) as exit_info:
        main(["data.resolution=16,2", "--repo", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.resolution" in err and "Traceback" not in err


@pytest.mark.slow  # a repro, a push, then a sweep through the queue
def test_a_fresh_workers_trial_pulls_the_baseline_instead_of_recomputing_it(harness, repo_copy):  # noqa: F811
    """The project's remote is a path relative to .dvc/; a queued experiment runs in a copy under .dvc/tmp/exps,
    so the sweep pins it absolute, and the trial (whose params leave ingest unchanged) pulls ingest's outputs."""
    subprocess.run([DVC, "remote", "add", "-d", "store", "../store"], cwd=repo_copy, check=True)
    _commit(repo_copy)
    done = subprocess.run([DVC, "repro"], cwd=repo_copy, env=stage_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    subprocess.run([DVC, "push", "-q"], cwd=repo_copy, check=True)
    subprocess.run(["git", "add", "dvc.lock"], cwd=repo_copy, check=True)  # the baseline, as a worker clones it
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], cwd=repo_copy,
                   check=True)
    shutil.rmtree(repo_copy / ".dvc" / "cache")  # a fresh clone: nothing but git and the remote
    shutil.rmtree(repo_copy / "data" / "ingest")
    (baseline,) = mlflow.search_runs(experiment_names=["knn-diffusion"], output_format="list",  # the repro's
                                     filter_string="tags.stage = 'ingest'", order_by=["attributes.start_time DESC"],
                                     max_results=1)
    assert sweep(axes=["train_continuous.k=3"], repo=str(repo_copy), prefix="pull") == ["pull-k-3"]
    assert "store" in (repo_copy / ".dvc" / "config.local").read_text()
    assert mlflow.search_runs(experiment_names=["knn-diffusion"], output_format="list",
                              filter_string="tags.pipeline_run = 'pull-k-3'") == []  # pulled, not run again
    assert baseline.info.status == "FINISHED"
