"""Shared fixtures: an isolated MLflow store per test session, small real inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Prefect's temporary server logs its shutdown at exit, after pytest has closed the captured streams.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session", autouse=True)
def isolated_mlflow(tmp_path_factory):
    """Every test logs to one throwaway sqlite store (created once: its migrations take seconds)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield f"sqlite:///{db}"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run a test from an empty directory (stages write relative to the cwd, like under DVC)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
