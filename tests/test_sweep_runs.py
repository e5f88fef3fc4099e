"""A sweep in MLflow: one parent run, one child per trial with its params, the trial's stage runs under
it; a trial that keeps failing is retried, then fails itself and the sweep, by name. Seen in the UI."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
import yaml
from prefect.settings import PREFECT_API_URL

from flows.sweep import sweep
from knn_diffusion.evaluation.runs import read_same_inputs
from knn_diffusion.stack.services import mlflow_server
from knn_diffusion.tracking import with_retries
from tests.browser import chromium_page, row_cells, show_columns
from tests.conftest import REPO
from tests.dvc_repo import DVC
from tests.test_pipeline_flow import harness, repo_copy  # noqa: F401 (fixtures)

# Each test runs a sweep through DVC's queue against a Prefect server (35-80 s each): the slow tier.
pytestmark = pytest.mark.slow


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
    trials = {r.info.run_name: r for r in _runs(kind="trial")
              if r.data.tags["mlflow.parentRunId"] == parent.info.run_id}
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
    flaky = {"cmd": "python -c \"import sys, yaml; "
                    "sys.exit(yaml.safe_load(open('params.yaml'))['data']['resolution'] == 24)\"",
             "params": ["data.resolution"], "outs": ["data/marker"]}
    flaky["cmd"] = flaky["cmd"].replace("sys.exit(", "import os; os.makedirs('data/marker', exist_ok=True); sys.exit(")
    _only(repo_copy, {"flaky": flaky})
    state = sweep(axes=["data.resolution=16,24"], repo=str(repo_copy), prefix="flaky", retries=1, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="flaky-resolution-24"):
        state.result()
    (parent,) = _runs(kind="sweep", **{"mlflow.runName": "sweep flaky"})
    assert parent.info.status == "FAILED" and "flaky-resolution-24" in parent.data.tags["failure"]
    trials = {r.info.run_name: r.info.status for r in _runs(kind="trial")
              if r.data.tags["mlflow.parentRunId"] == parent.info.run_id}
    assert trials == {"flaky-resolution-16": "FINISHED", "flaky-resolution-24": "FAILED"}


# A stand-in for the evaluate stage, seconds per trial: one stage run tagged with its DVC input hashes and one
# point child, as the real stage logs them. Under KNN_TEST_HOLD trials k=2 and k=3 wait in their stage (to be
# killed, or left running) until the file "release" appears in that folder.
FAKE_EVALUATE = """
import os, time, yaml
from knn_diffusion.stages.common import dvc_input_hashes
from knn_diffusion.tracking import child_run, repo_root, stage_run

k = yaml.safe_load(open("params.yaml"))["train_continuous"]["k"]
with stage_run("evaluate", {"train_continuous": {"k": k}}, tags=dvc_input_hashes(repo_root(), "evaluate")):
    hold = os.environ.get("KNN_TEST_HOLD")
    if hold and k in (2, 3):
        open(os.path.join(hold, f"started-{k}"), "w").close()
        for _ in range(1500):
            if os.path.exists(os.path.join(hold, "release")):
                break
            time.sleep(0.2)
        else:
            raise SystemExit("held for 5 minutes: never released")
    point = {"k": k, "trained_k": k, "guidance": 3, "index_fraction": 1.0, "index": "openmoji", "variant": "tokens",
             "fid_feature": "clip_image:test", "backbone": "continuous"}
    with child_run(f"k{k}", point, {"evaluate.kind": "grid_point"}) as run:
        run.metrics({"fid": 10.0 + k})
os.makedirs("outputs/fake", exist_ok=True)
open("outputs/fake/k.txt", "w").write(str(k))
"""


@contextlib.contextmanager
def _flow_log():
    """The flow runs' INFO lines (Prefect's run loggers do not propagate to pytest's caplog)."""
    logger, handler = logging.getLogger("prefect.flow_runs"), logging.Handler()
    handler.text = ""
    handler.emit = lambda record: setattr(handler, "text", handler.text + record.getMessage() + "\n")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _processes_in(folder) -> list[psutil.Process]:
    """Processes working in ``folder`` (this test's repo): the sweep's DVC calls, queue workers, stages."""
    found = []
    for proc in psutil.process_iter(["cwd"]):
        cwd = proc.info.get("cwd") or ""
        if cwd == str(folder) or cwd.startswith(f"{folder}/"):
            found.append(proc)
    return found


def _experiments(repo) -> dict[str, dict]:
    shown = json.loads(subprocess.run([DVC, "exp", "show", "--json"], cwd=repo, capture_output=True, text=True,
                                      check=True).stdout)
    return {e["name"]: e for entry in shown for e in entry.get("experiments") or []}


def _trial_status(name: str) -> str:
    found = _runs(kind="trial", **{"mlflow.runName": name})
    return found[0].info.status if found else ""


def _tree(prefix: str) -> tuple:
    """(parent runs of the sweep, {trial name: trial run} of the latest parent)."""
    parents = _runs(kind="sweep", **{"mlflow.runName": f"sweep {prefix}"})
    trials = [r for r in _runs(kind="trial") if r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id]
    assert len({t.info.run_name for t in trials}) == len(trials), "one child per trial"
    return parents, {t.info.run_name: t for t in trials}


def _release_when_resumed(parent_id: str, release: Path) -> threading.Thread:
    """Let the held stages go on once a rerun has reopened the sweep's parent run (its process tag changed)."""
    def process() -> str:
        return with_retries(lambda: mlflow.get_run(parent_id)).data.tags["sweep.process"]

    tag = process()

    def watch():
        while process() == tag:
            time.sleep(0.5)
        release.touch()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_killed_sweep_reruns_only_its_missing_trials(harness, repo_copy, tmp_path):  # noqa: F811
    """kill-k-1 finished; kill-k-3's queue worker is SIGKILLed with the sweep; kill-k-2's worker survives (as
    after Ctrl-C, which reaches the sweep but not DVC's daemonised workers). The rerun resumes the sweep."""
    (repo_copy / "fake_evaluate.py").write_text(FAKE_EVALUATE)
    _only(repo_copy, {"evaluate": {"cmd": "python fake_evaluate.py", "deps": ["fake_evaluate.py"],
                                   "params": ["train_continuous.k"], "outs": ["outputs/fake"]}})
    axes, hold = ["train_continuous.k=1,2,3"], tmp_path / "hold"
    hold.mkdir()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "KNN_TEST_HOLD": str(hold)}
    with open(tmp_path / "killed-sweep.log", "w") as log:
        killed = subprocess.Popen([sys.executable, "-m", "flows.sweep", *axes, "--repo", str(repo_copy),
                                   "--prefix", "kill", "--parallel", "2"], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not ((hold / "started-3").exists() and _trial_status("kill-k-1") == "FINISHED"):
            assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed-sweep.log").read_text()
            time.sleep(0.5)  # until kill-k-1 has finished, and kill-k-2 and kill-k-3 are in their stage
        killed.kill()
        killed.wait()
        execution = psutil.Process(_experiments(repo_copy)["kill-k-3"]["executor"]["local"]["pid"])
        worker = execution.parent()  # `dvc exp queue-worker`, below its `dvc queue start` daemon
        for proc in [worker.parent(), worker, execution, *execution.children(recursive=True)]:
            if proc.pid != 1:
                proc.kill()
        psutil.wait_procs([worker, execution], timeout=10)

        (parent,), before = _tree("kill")
        assert parent.info.status == "RUNNING"
        assert {n: t.info.status for n, t in before.items()} == {"kill-k-1": "FINISHED", "kill-k-2": "RUNNING",
                                                                 "kill-k-3": "RUNNING"}
        queue = subprocess.run([DVC, "queue", "status"], cwd=repo_copy, capture_output=True, text=True).stdout
        assert re.search(r"kill-k-3\s.*Running", queue), queue  # what DVC says of a task whose worker was killed
        exps = _experiments(repo_copy)
        dead_copy = exps["kill-k-3"]["executor"]["local"]["root"]

        releaser = _release_when_resumed(parent.info.run_id, hold / "release")
        with _flow_log() as log:
            assert sweep(axes=axes, repo=str(repo_copy), prefix="kill", parallel=2) == ["kill-k-1", "kill-k-2",
                                                                                        "kill-k-3"]
        releaser.join(timeout=5)
    finally:  # nothing of this test left running, whatever happened
        killed.kill()
        (hold / "release").touch()
        psutil.wait_procs(_processes_in(repo_copy), timeout=60)
        for proc in _processes_in(repo_copy):
            proc.kill()
    assert "kill-k-1: already done" in log.text and "kill-k-2: still running" in log.text
    assert _experiments(repo_copy)["kill-k-1"]["revs"][0]["rev"] == exps["kill-k-1"]["revs"][0]["rev"]  # not rerun
    (resumed,), after = _tree("kill")
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    assert {n: t.info.status for n, t in after.items()} == dict.fromkeys(before, "FINISHED")
    assert {n: t.info.run_id for n, t in after.items()} == {n: t.info.run_id for n, t in before.items()}
    stages = {name: sorted(r.info.status for r in _runs(stage="evaluate", pipeline_run=name)
                           if "evaluate.kind" not in r.data.tags) for name in after}
    # kill-k-1 not again, kill-k-2 once (waited for, not started twice), kill-k-3's stage run of the dead worker KILLED
    assert stages == {"kill-k-1": ["FINISHED"], "kill-k-2": ["FINISHED"], "kill-k-3": ["FINISHED", "KILLED"]}
    assert "Running" not in subprocess.run([DVC, "queue", "status"], cwd=repo_copy, capture_output=True,
                                           text=True).stdout
    assert not Path(dead_copy).exists()  # the killed experiment's working copy

    # The same trial under another name: DVC restores its evaluation from the run cache, so no evaluate run
    # is logged; the report takes the rows of the identical earlier evaluation (not the latest one), and names it.
    assert sweep(axes=["train_continuous.k=1"], repo=str(repo_copy), prefix="again") == ["again-k-1"]
    assert _runs(stage="evaluate", pipeline_run="again-k-1") == []
    by_k = pd.read_csv(repo_copy / "outputs" / "report" / "again" / "by_k.csv")
    assert by_k[["pipeline_run", "k", "fid", "restored_from"]].values.tolist() == [["again-k-1", 1, 11.0, "kill-k-1"]]
    assert "identical earlier evaluation by kill-k-1" in (repo_copy / "outputs/report/again/tables.md").read_text()
    (source,) = [r for r in _runs(stage="evaluate", pipeline_run="kill-k-1") if "evaluate.kind" not in r.data.tags]
    inputs = {"deps": {"fake_evaluate.py": source.data.tags["dvc.dep.fake_evaluate.py"]},
              "params": {"train_continuous.k": 1}}
    assert read_same_inputs(source, inputs)
    assert not read_same_inputs(source, {**inputs, "params": {"train_continuous.k": 2}})
    assert not read_same_inputs(source, {**inputs, "deps": {"fake_evaluate.py": "0" * 32}})

    # A finished sweep, rerun, has nothing to do (--fresh would run it again: tests/test_sweep.py).
    revs = {name: exp["revs"][0]["rev"] for name, exp in _experiments(repo_copy).items()}
    with _flow_log() as log:
        assert sweep(axes=["train_continuous.k=1"], repo=str(repo_copy), prefix="again") == ["again-k-1"]
    assert "again-k-1: already done" in log.text
    assert {name: exp["revs"][0]["rev"] for name, exp in _experiments(repo_copy).items()} == revs
    assert len(_tree("again")[0]) == 1
    psutil.wait_procs(_processes_in(repo_copy), timeout=30)  # idle queue workers exit by themselves
    assert _processes_in(repo_copy) == []
