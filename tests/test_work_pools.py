"""Team scale for real: a Prefect server, two process work pools with a worker each, the deployments of
prefect.yaml, stages routed by dvc.yaml's ``meta.pool``, data through a DVC remote only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from knn_diffusion.stack.services import prefect_server as start_prefect_server
from tests.conftest import REPO

BIN = Path(sys.executable).parent
# Two stand-in stages (the real ones are tested elsewhere): routing, data hand-over and the lock matter here.
STAGES = {
    "prepare": {"cmd": "python -c \"import pathlib; pathlib.Path('data').mkdir(exist_ok=True); "
                       "pathlib.Path('data/prepared.txt').write_text('prepared\\n')\"",
                "outs": ["data/prepared.txt"]},
    "train": {"cmd": "python -c \"import pathlib, yaml; p = pathlib.Path('models'); p.mkdir(exist_ok=True); "
                     "side = yaml.safe_load(open('params.yaml'))['data']['resolution']; "
                     "(p / 'model.txt').write_text(open('data/prepared.txt').read() + f'trained at {side} px\\n'); "
                     "pathlib.Path('metrics').mkdir(exist_ok=True); "
                     "pathlib.Path('metrics/train.json').write_text('{\\\"loss\\\": 0.5}')\"",
              "deps": ["data/prepared.txt"], "params": ["data.resolution"], "outs": ["models/model.txt"],
              "metrics": [{"metrics/train.json": {"cache": False}}],  # in git, not the remote: handed back too
              "meta": {"pool": "gpu"}},
}


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on loopback with its own home (sqlite), stopped at the end."""
    with start_prefect_server(tmp_path / "prefect-home", tmp_path / "server.log") as env:
        yield {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}


@pytest.fixture
def origin(tmp_path):
    """The team's git repository (workers clone it) with a DVC remote in a directory."""
    repo = tmp_path / "origin"
    repo.mkdir()
    shutil.copytree(REPO / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", repo / "prefect.yaml")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": STAGES}))
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")  # valid params: the flow logs them to MLflow
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run([str(BIN / "dvc"), "init", "-q"], repo, env)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], repo, env)
    run([str(BIN / "dvc"), "remote", "add", "-d", "team", str(tmp_path / "dvc-remote")], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline"], repo, env)
    return repo


@pytest.mark.slow  # a Prefect server, two process workers and a DVC remote (~45 s)
def test_pipeline_deployment_routes_stages_to_pools_through_the_remote(tmp_path, prefect_server, origin):
    env = {**prefect_server, "KNN_DIFFUSION_GIT_URL": str(origin)}
    prefect = str(BIN / "prefect")
    for pool in ("cpu", "gpu"):
        run([prefect, "work-pool", "create", pool, "--type", "process"], origin, env)
    run([prefect, "--no-prompt", "deploy", "--all"], origin, env)
    # Each worker in its own process group: stopping it also stops the flow-run processes it started.
    workers = [subprocess.Popen([prefect, "worker", "start", "--pool", pool, "--type", "process"], cwd=tmp_path,
                                env=env, stdout=open(tmp_path / f"worker-{pool}.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
               for pool in ("cpu", "gpu")]
    try:
        out = run([prefect, "deployment", "run", "knn-diffusion-pipeline/pools", "--watch",
                   "--watch-timeout", "400"], origin, env, timeout=450)
    except AssertionError:
        for pool in ("cpu", "gpu"):
            print(f"--- worker {pool}:\n" + (tmp_path / f"worker-{pool}.log").read_text()[-6000:])
        raise
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=5)  # the run is over; a worker can sit on SIGTERM for long
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    assert "Completed" in out, out[-2000:]

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        by_deployment: dict[str, list] = {}
        for flow_run in client.read_flow_runs():
            name = client.read_deployment(flow_run.deployment_id).name if flow_run.deployment_id else "-"
            by_deployment.setdefault(name, []).append((flow_run.parameters.get("stage"), flow_run.state.type.value))
    assert by_deployment["cpu"] == [("prepare", "COMPLETED")]
    assert by_deployment["gpu"] == [("train", "COMPLETED")]  # meta.pool: gpu in dvc.yaml

    # The outputs are in the remote and the run's lock on its branch: any machine can check it out and pull.
    clone = tmp_path / "elsewhere"
    plain = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    run(["git", "clone", "-q", "-b", "runs/latest", str(origin), str(clone)], tmp_path, plain)
    run([str(BIN / "dvc"), "pull"], clone, plain)
    assert (clone / "models" / "model.txt").read_text() == "prepared\ntrained at 32 px\n"
    assert json.loads((clone / "metrics" / "train.json").read_text()) == {"loss": 0.5}
    assert json.loads(run([str(BIN / "dvc"), "status", "--json"], clone, plain)) == {}


def test_stages_run_the_code_of_the_checkout_they_run_in(tmp_path):
    """A worker's clone (or a queued experiment's copy) executes its own src/, the code DVC hashed as the
    stage's deps - not the version installed in the environment."""
    from flows.dvc_cli import stage_env

    clone = tmp_path / "clone"
    shutil.copytree(REPO / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(["python", "-c", "import knn_diffusion; print(knn_diffusion.__file__)"], cwd=clone,
                          env=stage_env(), capture_output=True, text=True, check=True)
    assert Path(done.stdout.strip()) == clone / "src" / "knn_diffusion" / "__init__.py"
