"""Shared fixtures: an isolated MLflow store per test session, small real inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_PIPELINE_RUN = "tiny-pipeline"  # the pipeline_run tag of tiny_pipeline's stage runs
DVC_EXPERIMENT = "dvc-reproducibility"  # the MLflow experiment of dvc_pipeline's stage runs
# Prefect's temporary server logs its shutdown at exit, after pytest has closed the captured streams.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session", autouse=True)
def isolated_mlflow(tmp_path_factory):
    """Every test logs to one throwaway sqlite store (created once: its migrations take seconds)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield f"sqlite:///{db}"


@pytest.fixture(autouse=True)
def tests_store_after_each_test(isolated_mlflow):
    """A test that points MLflow elsewhere (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI too) must not
    send the next test's runs, or its stages' subprocesses, to a server it has since stopped."""
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != isolated_mlflow:
        import mlflow

        mlflow.set_tracking_uri(isolated_mlflow)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API server for every module whose flows need one (it takes seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run a test from an empty directory (stages write relative to the cwd, like under DVC)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """Every stage once on a few dozen real glyphs, in a scratch directory shared by the session.

    Read-only for tests: copy what a test changes (``copy_outputs``) or write under its own tmp_path.
    """
    import yaml

    from knn_diffusion.stages import embed, encoder, index, ingest, knn, sample, train_continuous
    from knn_diffusion.tracking import PIPELINE_RUN_ENV
    from tests.test_stages_end_to_end import TINY

    root = tmp_path_factory.mktemp("tiny-pipeline")
    (root / "params.yaml").write_text(yaml.safe_dump({**TINY, "tracking": {"experiment": "tiny-pipeline"}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv(PIPELINE_RUN_ENV, TINY_PIPELINE_RUN)  # tags these stage runs apart from the copies' runs
        for stage in (ingest, encoder, embed, index, knn, train_continuous, sample):
            stage.main([])
    return root


@pytest.fixture(scope="session")
def dvc_pipeline(tmp_path_factory):
    """Every stage of dvc.yaml reproduced once with the real ``dvc repro`` in a scratch git+DVC repo, each under
    the stage-input tracer (``tests/dvc_repo.py``), committed as v1.

    Never changed: tests that change it work on ``dvc_repo.copy_repo(dvc_pipeline, tmp_path / ...)``.
    """
    from tests import dvc_repo

    root = tmp_path_factory.mktemp("dvc-pipeline")
    params = dvc_repo.tiny_params(dvc_repo.tiny_open_clip(root), DVC_EXPERIMENT)
    repo = dvc_repo.make_repo(root / "repo", params, traced=True)
    dvc_repo.dvc(repo, "repro")
    dvc_repo.commit(repo, "v1")
    return repo


def copy_outputs(source: Path, target: Path, *relative: str) -> Path:
    """Copy some pipeline outputs (and params.yaml) of ``source`` into ``target``."""
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "params.yaml", target / "params.yaml")
    for item in relative:
        shutil.copytree(source / item, target / item)
    return target
