"""Real servers for the team-stack tests, on loopback, stopped when the test ends: Postgres (Debian's
`postgresql`), an S3 endpoint (moto's server mode) and an MLflow tracking server on both."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from glob import glob
from pathlib import Path
from typing import Callable, Iterator

import pytest

BIN = Path(sys.executable).parent
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{what} did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def answers(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            return False
    return ready


@contextlib.contextmanager
def background(cmd: list[str], log: Path, env: dict | None = None, user: str | None = None) -> Iterator[subprocess.Popen]:
    if user and os.geteuid() == 0:
        cmd = ["runuser", "-u", user, "--", *cmd]
    with open(log, "w") as out:
        # Its own process group: servers fork helpers (mlflow's job runner and consumers), all stopped here.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def postgres(database: str = "mlflow") -> Iterator[str]:
    """A throwaway cluster (initdb) serving ``database``; yields its SQLAlchemy URL."""
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("Debian postgresql is not installed; scripts/setup.sh installs it")
    bindir = Path(found[-1]).parent
    # Postgres refuses to run as root; its data directory must belong to the user it runs as.
    data = Path(tempfile.mkdtemp(prefix="knn-pg-"))
    user = "postgres" if os.geteuid() == 0 else None
    if user:
        shutil.chown(data, user)
    port = free_port()
    log = data / "server.log"
    try:
        subprocess.run((["runuser", "-u", user, "--"] if user else []) +
                       [str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True)
        cmd = [str(bindir / "postgres"), "-D", str(data / "db"), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
               "-k", str(data)]
        log.touch()
        if user:
            shutil.chown(log, user)
        with background(cmd, log, user=user) as proc:
            def ready() -> bool:
                return subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                      capture_output=True).returncode == 0
            wait_until(ready, proc, log, "postgres")
            subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database],
                           check=True, capture_output=True)
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
    finally:
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def s3_server(log_dir: Path, bucket: str) -> Iterator[str]:
    """moto's S3 server (HTTP, as MinIO or AWS speak it) with ``bucket`` created; yields the endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with background([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log_dir / "s3.log") as proc:
        wait_until(answers(f"{endpoint}/moto-api/"), proc, log_dir / "s3.log", "moto S3 server")
        import boto3

        boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=bucket)
        yield endpoint


def _boto_credentials() -> dict:
    return {"aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"]}


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@contextlib.contextmanager
def mlflow_server(log_dir: Path, backend_uri: str, artifacts: str, s3_endpoint: str = "") -> Iterator[str]:
    """`mlflow server` on loopback with its artifacts proxied to ``artifacts``; yields the tracking URI."""
    port = free_port()
    # No job runner (huey consumers for MLflow's GenAI jobs, which no test uses): it halves the start-up here.
    env = {**os.environ, **S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts]
    with background(cmd, log_dir / "mlflow.log", env=env) as proc:
        wait_until(answers(f"http://127.0.0.1:{port}/health"), proc, log_dir / "mlflow.log", "mlflow server", 180)
        yield f"http://127.0.0.1:{port}"
