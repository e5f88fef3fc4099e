"""The team stack's servers without containers: Debian's Postgres, moto's S3 server (standing in for MinIO,
which has no Debian or PyPI package), `mlflow server` and `prefect server` from the locked venv, and
Prefect process workers. Each is a command plus a readiness probe; `stack up` and the tests share them."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from glob import glob
from pathlib import Path
from typing import Iterator

from knn_diffusion.stack.processes import StackError, answers, as_user, background, free_port, wait_until

BIN = Path(sys.executable).parent
PG_USER = "postgres"  # the cluster's superuser (trust authentication, loopback only)
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "knn", "AWS_SECRET_ACCESS_KEY": "knn-diffusion-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


def postgres_bindir() -> Path | None:
    """Debian's versioned Postgres binaries (package `postgresql`), the newest installed; None when absent."""
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _pg(name: str) -> str:
    bindir = postgres_bindir()
    if bindir is None:
        raise StackError("Postgres is not installed: apt-get install postgresql (scripts/setup.sh does)")
    return str(bindir / name)


def pg_owner() -> str | None:
    """Postgres refuses to run as root: as root the cluster belongs to the `postgres` user."""
    return PG_USER if os.geteuid() == 0 else None


def init_postgres(cluster: Path) -> None:
    """`initdb` once; an existing cluster is kept (its data survives a restart of the stack)."""
    if (cluster / "PG_VERSION").exists():
        return
    cluster.parent.mkdir(parents=True, exist_ok=True)
    if pg_owner():
        shutil.chown(cluster.parent, pg_owner())
    done = subprocess.run([_pg("initdb"), "-D", str(cluster), "-A", "trust", "-U", PG_USER],
                          capture_output=True, text=True, **as_user(pg_owner()))
    if done.returncode != 0:
        raise StackError(f"initdb {cluster} failed: {done.stderr.strip().splitlines()[-1:]}")


def postgres_cmd(cluster: Path, host: str, port: int) -> list[str]:
    return [_pg("postgres"), "-D", str(cluster), "-p", str(port), "-c", f"listen_addresses={host}",
            "-k", str(cluster.parent)]


def postgres_ready(host: str, port: int) -> bool:
    return subprocess.run([_pg("pg_isready"), "-h", host, "-p", str(port)], capture_output=True).returncode == 0


def create_database(host: str, port: int, name: str) -> None:
    """Create ``name`` unless it exists (idempotent)."""
    done = subprocess.run([_pg("createdb"), "-h", host, "-p", str(port), "-U", PG_USER, name],
                          capture_output=True, text=True)
    if done.returncode != 0 and "already exists" not in done.stderr:
        raise StackError(f"createdb {name} failed: {done.stderr.strip()}")


def database_url(host: str, port: int, name: str, driver: str = "psycopg2") -> str:
    """SQLAlchemy URL: psycopg2 for MLflow, asyncpg for the Prefect server."""
    return f"postgresql+{driver}://{PG_USER}@{host}:{port}/{name}"


def s3_cmd(host: str, port: int) -> list[str]:
    return [str(BIN / "moto_server"), "-H", host, "-p", str(port)]


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"])


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def mlflow_env(s3_endpoint: str) -> dict:
    # No job runner (huey consumers for MLflow's GenAI jobs, which nothing here uses): it halves the start-up.
    env = {**os.environ, **S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def mlflow_cmd(host: str, port: int, backend_uri: str, artifacts: str) -> list[str]:
    return [str(BIN / "mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1",
            "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts]


def prefect_env(home: Path, api_url: str, database: str = "") -> dict:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PATH": f"{BIN}:{os.environ['PATH']}"}
    if database:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
    return env


def prefect_cmd(host: str, port: int) -> list[str]:
    return [str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(port)]


def worker_cmd(pool: str) -> list[str]:
    """A process worker; it creates its pool when the server has none of that name."""
    return [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]


# Context managers: a server for the duration of a block (tests, benchmarks).

@contextlib.contextmanager
def postgres(database: str = "mlflow") -> Iterator[str]:
    """A throwaway cluster serving ``database``; yields its SQLAlchemy URL."""
    data = Path(tempfile.mkdtemp(prefix="knn-pg-"))
    port = free_port()
    try:
        init_postgres(data / "db")
        with background(postgres_cmd(data / "db", "127.0.0.1", port), data / "server.log", user=pg_owner()) as proc:
            wait_until(lambda: postgres_ready("127.0.0.1", port), proc, data / "server.log", "postgres")
            create_database("127.0.0.1", port, database)
            yield database_url("127.0.0.1", port, database)
    finally:
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def s3_server(log_dir: Path, bucket: str) -> Iterator[str]:
    """moto's S3 server (HTTP, as MinIO or AWS speak it) with ``bucket`` created; yields the endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with background(s3_cmd("127.0.0.1", port), log_dir / "s3.log") as proc:
        wait_until(answers(f"{endpoint}/moto-api/"), proc, log_dir / "s3.log", "moto S3 server")
        s3_client(endpoint).create_bucket(Bucket=bucket)
        yield endpoint


@contextlib.contextmanager
def mlflow_server(log_dir: Path, backend_uri: str, artifacts: str, s3_endpoint: str = "") -> Iterator[str]:
    """`mlflow server` on loopback with its artifacts proxied to ``artifacts``; yields the tracking URI."""
    port = free_port()
    with background(mlflow_cmd("127.0.0.1", port, backend_uri, artifacts), log_dir / "mlflow.log",
                    env=mlflow_env(s3_endpoint)) as proc:
        wait_until(answers(f"http://127.0.0.1:{port}/health"), proc, log_dir / "mlflow.log", "mlflow server", 180)
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def prefect_server(home: Path, log: Path, database: str = "") -> Iterator[dict]:
    """`prefect server start` on loopback (sqlite in ``home`` unless ``database``); yields the client env."""
    port = free_port()
    env = prefect_env(home, f"http://127.0.0.1:{port}/api", database)
    with background(prefect_cmd("127.0.0.1", port), log, env=env) as proc:
        wait_until(answers(f"http://127.0.0.1:{port}/api/health"), proc, log, "prefect server", 180)
        yield env
