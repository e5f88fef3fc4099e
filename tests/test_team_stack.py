"""The team stack's files: the compose file validates, and the worker images' import path is complete."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "docker" / "compose.yaml"
STACK_SERVICES = {"postgres", "minio", "minio-bucket", "prefect-server", "mlflow", "worker-cpu", "worker-gpu"}


def compose_config(path: Path) -> subprocess.CompletedProcess:
    """`docker-compose config`: a real compose implementation validates and resolves the file (no engine)."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (Debian package) is not installed; scripts/setup.sh installs it")
    return subprocess.run(["docker-compose", "-f", str(path), "config"], capture_output=True, text=True,
                          cwd=path.parent)


def test_compose_file_validates_and_wires_the_stack():
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr
    stack = yaml.safe_load(result.stdout)["services"]
    assert set(stack) == STACK_SERVICES
    gpu = stack["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert stack["worker-gpu"]["build"]["target"] == "gpu" and stack["mlflow"]["build"]["target"] == "cpu"
    assert stack["worker-cpu"]["command"][-3:] == ["cpu", "--type", "process"]
    # Both servers on the one Postgres; MLflow's artifacts in the bucket that is also the DVC remote.
    assert "@postgres:5432/prefect" in stack["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_cmd = " ".join(stack["mlflow"]["command"])
    assert "@postgres:5432/mlflow" in mlflow_cmd and "s3://knn-diffusion/mlflow" in mlflow_cmd
    for worker in ("worker-cpu", "worker-gpu"):
        env = stack[worker]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["AWS_ENDPOINT_URL"] == "http://minio:9000"


def test_compose_validation_rejects_a_broken_file(tmp_path):
    """The validator is real: a misspelt service key fails it."""
    broken = tmp_path / "compose.yaml"
    worker = "    command: [\"prefect\", \"worker\""
    misspelt = COMPOSE.read_text().replace(worker, worker.replace("command", "comand"), 1)
    broken.write_text(misspelt)
    shutil.copy(REPO / "docker" / "postgres-init.sql", tmp_path)
    result = compose_config(broken)
    assert result.returncode != 0 and "comand" in result.stdout + result.stderr


def _modules_in(root: Path, package: str) -> set[str]:
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            for p in (root / package).rglob("*.py")}


def _build_wheel(out: Path) -> Path:
    """The wheel `pip install .` would install, built from a copy (setuptools writes build/ in the source)."""
    source = out / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("src", "flows"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, capture_output=True)
    return next(out.glob("knn_diffusion-*.whl"))


IMPORT_ALL = """
import importlib, json, sys
names = json.loads(sys.argv[1])
where = {name: importlib.import_module(name).__file__ for name in names}
print(json.dumps(where))
"""


@pytest.mark.slow  # builds a wheel and imports every module from it (~18 s): `make test-slow`, with the stack
def test_wheel_carries_and_imports_every_module(tmp_path):
    """What the worker images install (`pip install .`, not editable) holds the library AND the flows,
    and every module imports from it alone with the locked dependencies."""
    wheel = _build_wheel(tmp_path / "dist")
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    expected = _modules_in(REPO / "src", "knn_diffusion") | _modules_in(REPO, "flows")
    shipped = _modules_in(unpacked, "knn_diffusion") | _modules_in(unpacked, "flows")
    assert expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"
    import json

    # PYTHONPATH comes before the editable install's finder, and the cwd is outside the repo.
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL, json.dumps(sorted(expected))], cwd=tmp_path,
                            env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    files = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(Path(f).is_relative_to(unpacked) for f in files.values())


@pytest.mark.slow
@pytest.mark.parametrize("image", ["cpu", "gpu"])
def test_fresh_venv_from_the_lock_imports_everything(tmp_path, image):
    """As docker/Dockerfile builds it: a new venv from requirements.lock (+ faiss-gpu for the GPU image)
    and the wheel alone; every module imports on this CPU-only machine. Minutes and ~6 GB: `make test-slow`."""
    import json

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(REPO / "requirements.lock")], check=True)
    if image == "gpu":
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "faiss-cpu"], check=True)
        subprocess.run([*pip, "faiss-gpu==1.15.1"], check=True)
    subprocess.run([*pip, "--no-deps", str(_build_wheel(tmp_path / "dist"))], check=True)
    expected = _modules_in(REPO / "src", "knn_diffusion") | _modules_in(REPO, "flows")
    result = subprocess.run([str(venv / "bin" / "python"), "-c", IMPORT_ALL, json.dumps(sorted(expected))],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
