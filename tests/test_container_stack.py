"""`make test-stack`: docker/compose.yaml built and started under a real engine, a pipeline deployment run
through its Prefect server and cpu worker, its MLflow runs, bucket and DVC remote checked, all torn down.

Under podman without a registry, docker/test/compose.stand-ins.yaml swaps the images that cannot be made
here: Debian's Postgres for postgres:15, moto's S3 server (in the project's image) for MinIO, the
project's image (same Prefect from the lock) for prefecthq/prefect."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from knn_diffusion.stack.processes import answers
from knn_diffusion.stack.services import S3_CREDENTIALS, s3_client, s3_keys
from tests import dvc_repo
from tests.container_engine import REPO, Engine, sh, wheelhouse

pytestmark = [pytest.mark.stack, pytest.mark.timeout(5400)]  # a first build takes tens of minutes
PROJECT = "knn-stack-test"
SERVICES = ["postgres", "minio", "minio-bucket", "prefect-server", "mlflow", "worker-cpu"]  # no GPU here
HOST = "127.0.0.1"
GPU_IMPORTS = ("import faiss, torch; print('faiss-gpu' if hasattr(faiss, 'StandardGpuResources') else 'faiss-cpu', "
               "faiss.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)")
WHEELS = Path(os.environ.get("KNN_DIFFUSION_WHEELHOUSE", Path.home() / ".cache" / "knn-diffusion" / "wheelhouse"))


def poll(what: str, ready, seconds: float = 300) -> float:
    start = time.time()
    while not ready():
        if time.time() - start > seconds:
            raise AssertionError(f"{what} not ready after {seconds} s")
        time.sleep(2)
    return time.time() - start


def bucket_exists() -> bool:
    try:
        s3_client(f"http://{HOST}:9000").head_bucket(Bucket="knn-diffusion")
        return True
    except Exception:  # connection refused or no bucket yet: both mean "not yet"
        return False


def merged_compose(files: list[Path], out: Path, env: dict) -> Path:
    """One resolved file (absolute paths) from a real compose implementation: podman-compose 1.0.3 appends
    an override's `command:` list to the base's instead of replacing it."""
    out.write_text(sh(["docker-compose", *(a for f in files for a in ("-f", str(f))), "config"], env=env,
                      cwd=files[0].parent))
    return out


def make_origin(root: Path) -> Path:
    """The team's git repository (mounted into the worker): the ingest stage, tiny params, the S3 remote."""
    origin = dvc_repo.make_repo(root / "origin", dvc_repo.tiny_params(dvc_repo.tiny_open_clip(root), "stack-test"),
                                stages=("ingest",))
    shutil.copytree(REPO / "flows", origin / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", origin / "prefect.yaml")
    # No endpoint in the config: AWS_ENDPOINT_URL says where the bucket is (minio:9000 inside, loopback here).
    dvc_repo.dvc(origin, "remote", "add", "-d", "stack", "s3://knn-diffusion/dvc")
    dvc_repo.commit(origin, "pipeline on the team stack")
    dvc_repo.run(origin, "git", "branch", "-M", "main")  # prefect.yaml's git_clone step checks out main
    return origin


def test_compose_stack_runs_a_pipeline_deployment(tmp_path, record_property):
    wall = time.time()
    engine = Engine()
    engine.ensure_local_bases()
    wheels = wheelhouse(WHEELS) if engine.name == "podman" else None
    build_cpu = engine.build("cpu", "knn-diffusion:cpu", wheels)
    build_postgres = 0.0
    files = [REPO / "docker" / "compose.yaml"]
    if engine.name == "podman":
        files.append(REPO / "docker" / "test" / "compose.stand-ins.yaml")
        start = time.time()
        engine("build", "-t", "localhost/knn-diffusion-stand-in/postgres:15", "-f",
               str(REPO / "docker" / "test" / "postgres.Dockerfile"), str(REPO / "docker" / "test"))
        build_postgres = time.time() - start
    origin = make_origin(tmp_path)
    env = {**os.environ, "KNN_DIFFUSION_TEST_ORIGIN": str(origin)}
    compose = [*engine.compose, "-p", PROJECT, "-f", str(merged_compose(files, tmp_path / "compose.yaml", env))]
    host_env = {**dvc_repo.env(origin), **S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{HOST}:9000",
                "PREFECT_API_URL": f"http://{HOST}:4200/api", "MLFLOW_TRACKING_URI": f"http://{HOST}:5000",
                "KNN_DIFFUSION_GIT_URL": "/origin", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    try:
        sh([*compose, "up", "-d", "--no-build", *SERVICES], env=env, timeout=600)
        ready = {"prefect-server": poll("prefect", answers(f"http://{HOST}:4200/api/health")),
                 "mlflow": poll("mlflow", answers(f"http://{HOST}:5000/health")),
                 "bucket": poll("bucket", bucket_exists)}
        prefect = str(Path(sys.executable).parent / "prefect")
        for pool in ("cpu", "gpu"):
            subprocess.run([prefect, "work-pool", "create", pool, "--type", "process"], env=host_env,
                           capture_output=True)  # the cpu worker may have made its pool already
        sh([prefect, "--no-prompt", "deploy", "--all"], env=host_env, cwd=origin, timeout=600)
        run = subprocess.run([prefect, "deployment", "run", "knn-diffusion-pipeline/pools", "--watch",
                              "--watch-timeout", "1500"], env=host_env, cwd=origin, capture_output=True,
                             text=True, timeout=1600)
        if run.returncode != 0 or "Completed" not in run.stdout:
            logs = subprocess.run([engine.name, "logs", "--tail", "80", f"{PROJECT}_worker-cpu_1"],
                                  capture_output=True, text=True)
            raise AssertionError(f"deployment run failed:\n{run.stdout[-3000:]}\n{logs.stdout}{logs.stderr}")

        from mlflow import MlflowClient

        client = MlflowClient(host_env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("stack-test").experiment_id])
        assert runs and all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
        ingest = next(r for r in runs if r.info.run_name == "ingest")
        assert ingest.data.tags.get("mlflow.parentRunId"), "the stage run is nested under the pipeline run"
        keys = s3_keys(host_env["AWS_ENDPOINT_URL"], "knn-diffusion")
        assert any(k.startswith("mlflow/") and ingest.info.run_id in k for k in keys), keys[:20]
        assert any(k.startswith("dvc/files/md5/") for k in keys), keys[:20]

        clone = tmp_path / "second-clone"
        sh(["git", "clone", "-q", "-b", "runs/latest", str(origin), str(clone)], env=host_env)
        sh([dvc_repo.DVC, "pull"], env=host_env, cwd=clone, timeout=600)
        assert json.loads(sh([dvc_repo.DVC, "status", "--json"], env=host_env, cwd=clone) or "{}") == {}
        assert (clone / "data").exists()
    finally:
        subprocess.run([*compose, "down", "-v"], env=env, capture_output=True, timeout=600)
    # The gpu target: built and imported here (no GPU); scripts/gpu_check.sh runs CUDA on a GPU machine.
    build_gpu = engine.build("gpu", "knn-diffusion:gpu", wheels)
    imported = engine("run", "--rm", "knn-diffusion:gpu", "python", "-c", GPU_IMPORTS)
    assert "faiss-gpu" in imported and "cuda 13" in imported, imported
    sizes = {tag: round(engine.image_size(tag) / 1e9, 2) for tag in ("knn-diffusion:cpu", "knn-diffusion:gpu")}
    engine("rmi", "knn-diffusion:gpu")  # gigabytes; the cpu image stays for the next run's cache
    figures = {"engine": engine.name, "build_cpu_s": round(build_cpu), "build_gpu_s": round(build_gpu),
               "build_postgres_s": round(build_postgres),
               "ready_s": {k: round(v) for k, v in ready.items()}, "image_gb": sizes,
               "wall_s": round(time.time() - wall)}
    print("test-stack figures:", json.dumps(figures))
    record_property("figures", figures)
    leftover = sh([engine.name, "volume", "ls", "-q"]).split()
    assert not [v for v in leftover if v.startswith(PROJECT)], leftover
