"""`knn-diffusion stack`: the team stack as local processes, started, checked, restarted and stopped for real."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from knn_diffusion.stack.command import DEFAULT_PORTS, load_settings
from knn_diffusion.stack.processes import alive, free_port
from knn_diffusion.stack.services import s3_keys


def stack(action: str, data_dir: Path, ports: dict[str, int] | None = None, timeout: float = 600):
    flags = [f"--{name}-port={port}" for name, port in (ports or {}).items()]
    return subprocess.run([sys.executable, "-m", "knn_diffusion.cli", "stack", action, "--data-dir", str(data_dir),
                           *flags], capture_output=True, text=True, timeout=timeout)


def source(env_file: Path) -> dict[str, str]:
    pairs = (line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines()
             if line.startswith("export "))
    return {key: value for key, value in pairs}


def test_up_refuses_a_port_in_use_and_starts_nothing(tmp_path):
    ports = {name: free_port() for name in DEFAULT_PORTS}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["mlflow"]))
        taken.listen()
        done = stack("up", tmp_path / "stack", ports, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: port ") and f"{ports['mlflow']}" in lines[0], lines
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "stack" / "stack.json").exists() and not (tmp_path / "stack" / "logs").exists()


def _log_nested_run(env: dict[str, str], monkeypatch) -> str:
    """Log through the stack, then point this process back at the tests' store: mlflow.set_tracking_uri also
    exports MLFLOW_TRACKING_URI, and later tests must not talk to a stack this test has stopped."""
    import mlflow

    for key in (k for k in env if k.startswith(("AWS_", "MLFLOW_S3"))):
        monkeypatch.setenv(key, env[key])
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        mlflow.set_experiment("stack-test")
        with mlflow.start_run(run_name="parent") as parent:
            mlflow.log_text("kept", "note.txt")
            with mlflow.start_run(run_name="stage", nested=True):
                mlflow.log_metric("loss", 0.5)
    finally:
        mlflow.set_tracking_uri(previous)
    return parent.info.run_id


def _finished_runs(uri: str) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("stack-test")
    return {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}


@pytest.mark.slow
def test_stack_up_status_restart_down_keeps_the_data(monkeypatch):
    data = Path(tempfile.mkdtemp(prefix="knn-stack-"))  # as root, Postgres's user must reach the cluster
    data.chmod(0o755)
    ports = {name: free_port() for name in DEFAULT_PORTS}
    try:
        done = stack("up", data, ports)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("healthy") == 6, done.stdout
        first = load_settings(data).processes
        again = stack("up", data, ports)  # idempotent: nothing new started
        assert again.returncode == 0 and load_settings(data).processes == first, again.stderr

        env = source(data / "stack.env")
        assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['prefect']}/api"
        parent = _log_nested_run(env, monkeypatch)
        assert _finished_runs(env["MLFLOW_TRACKING_URI"]) == {"parent": "FINISHED", "stage": "FINISHED"}

        # Postgres restarts: it goes down (a fast shutdown, as `pg_ctl stop -m fast` does: SIGTERM would wait for
        # MLflow's pooled connections to close), `stack status` says so, `up` starts only it, the runs are all there.
        os.kill(first["postgres"]["pid"], signal.SIGINT)
        while alive(**first["postgres"]):
            time.sleep(0.2)
        assert "postgres     127.0.0.1" in stack("status", data).stdout
        assert "stopped" in stack("status", data).stdout.splitlines()[0]
        assert stack("up", data, ports).returncode == 0
        restarted = load_settings(data).processes
        assert restarted["postgres"] != first["postgres"]
        assert {k: v for k, v in restarted.items() if k != "postgres"} == \
            {k: v for k, v in first.items() if k != "postgres"}
        assert _finished_runs(env["MLFLOW_TRACKING_URI"]) == {"parent": "FINISHED", "stage": "FINISHED"}

        # down stops exactly the recorded process groups; up again finds the runs and their artifacts.
        assert stack("down", data).returncode == 0
        assert not any(alive(**record) for record in restarted.values())
        assert all(line.endswith("stopped") for line in stack("status", data).stdout.splitlines())
        assert stack("up", data, ports).returncode == 0
        assert _finished_runs(env["MLFLOW_TRACKING_URI"]) == {"parent": "FINISHED", "stage": "FINISHED"}
        assert any(key.endswith(f"{parent}/artifacts/note.txt") for key in s3_keys(env["AWS_ENDPOINT_URL"],
                                                                                   "knn-diffusion"))
    finally:
        stack("down", data)
        shutil.rmtree(data, ignore_errors=True)
