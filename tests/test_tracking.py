"""Stage runs are traceable (params, git commit, input hashes) and safe to open concurrently."""

from __future__ import annotations

import multiprocessing as mp

import mlflow
import numpy as np

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
