"""Stage runs are traceable (params, git commit, input hashes) and safe to open concurrently."""

from __future__ import annotations

import multiprocessing as mp

import mlflow
import numpy as np
import pytest

from knn_diffusion.tracking import stage_run


def _one_stage(name: str) -> None:
    with stage_run(name, {"section": {"value": 1, "nested": {"flag": True}}}, experiment="concurrency") as run:
        run.metrics({"answer": 42})
        run.image(np.zeros((8, 8, 3), dtype=np.uint8), "grid.png")


def test_stage_run_logs_params_tags_metrics(in_tmp):
    with stage_run("demo", {"data": {"resolution": 32, "split": {"val": 0.1}}}, experiment="tracking") as run:
        run.metrics({"images": 10})
        run_id = run.id
    got = mlflow.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"data.resolution": "32", "data.split.val": "0.1"}
    assert got.data.tags["stage"] == "demo" and "git.commit" in got.data.tags
    assert got.data.metrics["images"] == 10


def test_failed_stage_marks_run_failed(in_tmp):
    try:
        with stage_run("crash", {}, experiment="tracking") as run:
            run_id = run.id
            raise KeyError("boom")
    except KeyError:
        pass
    assert mlflow.get_run(run_id).info.status == "FAILED"


def test_two_stages_at_once(in_tmp):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_one_stage, args=(f"stage{i}",)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    runs = mlflow.search_runs(experiment_names=["concurrency"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["stage0", "stage1"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["answer"] == 42 for r in runs)


def test_a_tracking_server_that_does_not_answer_is_one_line(in_tmp, monkeypatch):
    """Nothing listens on the port (a refusal for real): one line naming the server, which the flows recognise
    and wait for before they retry the stage."""
    from flows.dvc_cli import TRACKING_DOWN, tracking_server_back
    from knn_diffusion.stack.processes import free_port
    from knn_diffusion.tracking import TrackingUnavailable

    uri = f"http://127.0.0.1:{free_port()}"
    previous = mlflow.get_tracking_uri()  # stage_run points MLflow at the dead server: back to the tests' store after
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default backs off for minutes
    try:
        with pytest.raises(TrackingUnavailable) as raised:
            with stage_run("demo", {}, experiment="tracking"):
                pass
    finally:
        mlflow.set_tracking_uri(previous)
    message = str(raised.value)
    assert message.startswith(f"MLflow tracking server at {uri} is unreachable (connection refused) as stage 'demo' "
                              "opened its run;") and "\n" not in message, message
    assert TRACKING_DOWN.search(f"error: {message}").group(1) == uri
    assert not tracking_server_back(uri, seconds=0)


def test_a_later_attempt_ends_a_lost_one_failed(in_tmp, monkeypatch):
    """A stage run left RUNNING by an attempt that lost its server or its process is ended FAILED (with the runs
    nested under it) by the next attempt of the stage in the same pipeline run, and by nothing else."""
    from mlflow import MlflowClient

    from knn_diffusion.tracking import PIPELINE_RUN_ENV, experiment_id_for

    client = MlflowClient()
    experiment_id = experiment_id_for("tracking-lost", client)
    monkeypatch.setenv(PIPELINE_RUN_ENV, "run-1")
    lost = client.create_run(experiment_id, run_name="demo", tags={"stage": "demo", "pipeline_run": "run-1"})
    nested = client.create_run(experiment_id, run_name="k3", tags={"mlflow.parentRunId": lost.info.run_id})
    other = client.create_run(experiment_id, run_name="demo", tags={"stage": "demo", "pipeline_run": "run-2"})
    with stage_run("demo", {}, experiment="tracking-lost") as run:
        pass
    status = {r: client.get_run(r).info.status for r in (lost.info.run_id, nested.info.run_id, other.info.run_id,
                                                         run.id)}
    client.set_terminated(other.info.run_id)
    assert list(status.values()) == ["FAILED", "FAILED", "RUNNING", "FINISHED"]
    assert client.get_run(lost.info.run_id).data.tags["failure"].startswith("lost:")
