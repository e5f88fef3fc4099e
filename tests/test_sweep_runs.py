"""A sweep in MLflow: one parent run, one child per trial with its params, the trial's stage runs under
it; a trial that keeps failing is retried, then fails itself and the sweep, by name. Seen in the UI."""

from __future__ import annotations

import re
import subprocess

import mlflow
import pytest
import yaml

from flows.sweep import sweep
from tests.test_pipeline_flow import harness, repo_copy  # noqa: F401 (fixtures)
from tests.browser import chromium_page, row_cells, show_columns
from tests.team_servers import mlflow_server


def _only(repo, stages: dict) -> None:
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    spec["stages"] = stages
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"], cwd=repo, check=True)


def _runs(**tags) -> list:
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    return mlflow.search_runs(experiment_names=["knn-diffusion"], filter_string=query, output_format="list")


def test_sweep_parent_trials_and_stage_runs_in_the_ui(harness, repo_copy, tmp_path):  # noqa: F811
    ingest = yaml.safe_load((repo_copy / "dvc.yaml").read_text())["stages"]["ingest"]
    ingest["params"].append("train_continuous.k")  # so each trial runs it: the tracking machinery is the point
    _only(repo_copy, {"ingest": ingest})
    names = sweep(axes=["train_continuous.k=1,2"], repo=str(repo_copy), prefix="nest")
    (parent,) = _runs(kind="sweep", **{"mlflow.runName": "sweep nest"})
    assert parent.info.status == "FINISHED"
    trials = {r.info.run_name: r for r in _runs(kind="trial") if r.data.tags["mlflow.parentRunId"] == parent.info.run_id}
    assert set(trials) == set(names)
    for name, k in zip(names, ("1", "2")):
        assert trials[name].data.params["train_continuous.k"] == k  # every param of the trial, flattened
        (stage,) = _runs(stage="ingest", pipeline_run=name)
        assert stage.data.tags["mlflow.parentRunId"] == trials[name].info.run_id
        assert stage.data.tags["dvc.experiment"] == name

    experiment = mlflow.get_experiment_by_name("knn-diffusion").experiment_id
    with mlflow_server(tmp_path, mlflow.get_tracking_uri(), str(tmp_path / "artifacts")) as ui, chromium_page() as page:
        page.goto(f"{ui}/#/experiments/{experiment}/runs")  # the training runs table, not the GenAI view
        row = page.get_by_role("row").filter(has_text=re.compile(r"sweep nest"))
        row.first.wait_for(timeout=90_000)
        row.first.locator("button").first.click()  # expand the parent: its trials are nested under it
        page.get_by_role("row").filter(has_text=names[1]).first.wait_for(timeout=30_000)
        show_columns(page, ["train_continuous.k"])
        page.screenshot(path=tmp_path / "sweep-runs.png")
        cells = {name: row_cells(page, name) for name in names}
    assert cells[names[0]][-1] == "1" and cells[names[1]][-1] == "2", cells  # the k column, last


def test_a_failing_trial_is_retried_then_fails_the_sweep_by_name(harness, repo_copy):  # noqa: F811
    flaky = {"cmd": "python -c \"import sys, yaml; sys.exit(yaml.safe_load(open('params.yaml'))['data']['resolution'] == 24)\"",
             "params": ["data.resolution"], "outs": ["data/marker"]}
    flaky["cmd"] = flaky["cmd"].replace("sys.exit(", "import os; os.makedirs('data/marker', exist_ok=True); sys.exit(")
    _only(repo_copy, {"flaky": flaky})
    state = sweep(axes=["data.resolution=16,24"], repo=str(repo_copy), prefix="flaky", retries=1, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="flaky-resolution-24"):
        state.result()
    (parent,) = _runs(kind="sweep", **{"mlflow.runName": "sweep flaky"})
    assert parent.info.status == "FAILED" and "flaky-resolution-24" in parent.data.tags["failure"]
    trials = {r.info.run_name: r.info.status for r in _runs(kind="trial") if r.data.tags["mlflow.parentRunId"] == parent.info.run_id}
    assert trials == {"flaky-resolution-16": "FINISHED", "flaky-resolution-24": "FAILED"}
