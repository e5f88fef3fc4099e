"""The team stack under faults, each a test with real servers on loopback and the project's real ingest stage:

- the MLflow server is killed while a pipeline run's stage logs to it: the stage fails with one `error:` line,
  the flow's retry runs it again once the server is back, the flow finishes and no run is left RUNNING;
- a worker (and the flow run it started: a dead machine takes both) is killed mid-stage: Prefect's zombie
  automation marks the run Crashed, the pipeline puts it back in the queue, a new worker runs it to the end,
  and neither DVC's cache nor the S3 bucket holds a partial object.

(A Postgres restart and a port in use are in test_stack_command.py.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from flows.dvc_cli import TRACKING_WAIT_ENV
from knn_diffusion.stack.processes import answers, free_port, start, stop_group, wait_until
from knn_diffusion.stack.services import (
    S3_CREDENTIALS,
    mlflow_cmd,
    mlflow_env,
    prefect_server,
    s3_client,
    s3_keys,
    s3_server,
)
from knn_diffusion.stack.zombies import HEARTBEAT_ENV, ensure_zombie_automation
from knn_diffusion.tracking import PIPELINE_RUN_ENV
from tests import dvc_repo
from tests.conftest import REPO

BIN = Path(sys.executable).parent
BUCKET = "knn-diffusion"
EXPERIMENT = "faults"
# A thousand glyphs: ingest spends a couple of seconds between opening its run and its next call to MLflow,
# the window in which each test kills something.
IMAGES = 1000


def _params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["datasets"] = {"openmoji": {"source": "openmoji", "limit": IMAGES}}
    params["tracking"]["experiment"] = EXPERIMENT
    return params


def _code_env(repo: Path) -> dict[str, str]:
    """The scratch repo's stage code and this checkout's flows (the editable install may point elsewhere)."""
    return {**dvc_repo.env(repo), "PYTHONPATH": os.pathsep.join([str(repo / "src"), str(REPO)])}


def _runs(client: MlflowClient, query: str = "") -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], query) if experiment else []


def _wait_for(condition, what: str, seconds: float, alive=lambda: True, interval: float = 0.1) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert alive() and time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(interval)


def _mlflow_server(port: int, data: Path) -> subprocess.Popen:
    """`mlflow server` on loopback (sqlite store, artifacts proxied into a folder), in its own process group."""
    proc = start(mlflow_cmd("127.0.0.1", port, f"sqlite:///{data / 'mlflow.db'}", str(data / "artifacts")),
                 data / "mlflow.log", env=mlflow_env(""))
    wait_until(answers(f"http://127.0.0.1:{port}/health"), proc, data / "mlflow.log", "mlflow server", 180)
    return proc


@pytest.mark.slow  # an MLflow server started twice, a one-stage pipeline run, its stage twice: 42-53 s here
def test_mlflow_server_killed_mid_stage_fails_it_in_one_line_and_the_retry_finishes(tmp_path):
    repo = dvc_repo.make_repo(tmp_path / "repo", _params(), stages=("ingest",))
    data = tmp_path / "mlflow"
    data.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(port, data)
    # MLflow's client retries a refused call for up to 4 minutes by default (a restart it rides out unseen);
    # with no retries the outage below is a failure of the stage at once.
    env = {**_code_env(repo), "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           TRACKING_WAIT_ENV: "240", "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    flow = subprocess.Popen([sys.executable, "-u", "-m", "flows.pipeline", "--repo", str(repo)], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    failed = threading.Event()

    def read() -> None:
        for line in flow.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("error: MLflow tracking server"):
                failed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    client = MlflowClient(uri)
    try:
        try:
            # The stage has opened its run: kill the server (its whole group, as the OOM killer or a crash would).
            _wait_for(lambda: _runs(client, "tags.stage = 'ingest' and attributes.status = 'RUNNING'"),
                      "the stage's run", 300, alive=lambda: flow.poll() is None)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            assert failed.wait(120), "\n".join(lines[-60:])
            server = _mlflow_server(port, data)  # back on the same port and store; the retry waits for it
            flow.wait(timeout=400)
            reader.join(timeout=30)
        finally:
            stop_group(flow.pid, grace=10)  # the flow, its temporary Prefect server, DVC and the stage
            flow.wait()
        _check_mlflow_fault(lines, uri, client, flow.returncode)
    finally:
        stop_group(server.pid, grace=10)
        server.wait()
    assert dvc_repo.status(repo) == {}


def _check_mlflow_fault(lines: list[str], uri: str, client: MlflowClient, returncode: int) -> None:
    assert returncode == 0, "\n".join(lines)[-6000:]
    # The failed attempt's output: one `error:` line, no traceback.
    first = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    attempt = lines[max(i for i, line in enumerate(lines[:first]) if "Running stage 'ingest'" in line):first + 1]
    assert [line for line in attempt if line.lower().startswith("error")] == [lines[first]], "\n".join(attempt)
    assert "Traceback" not in "\n".join(attempt), "\n".join(attempt)
    assert re.fullmatch(rf"error: MLflow tracking server at {re.escape(uri)} is unreachable \([a-z ]+\) while stage "
                        r"'ingest' logged to run \w+; start it again or point MLFLOW_TRACKING_URI at a live one, "
                        r"then rerun", lines[first]), lines[first]
    print(f"\nthe stage's line: {lines[first]}")
    assert {line for line in lines if line.startswith("error: ")} == {lines[first]}  # the retry failed nowhere

    # The retry ran the stage again: its run FINISHED, the lost attempt's ended FAILED by it, nothing RUNNING.
    runs = _runs(client)
    ingest = {r.info.status: r for r in runs if r.data.tags.get("stage") == "ingest"}
    assert sorted(r.info.status for r in runs if r.data.tags.get("stage") == "ingest") == ["FAILED", "FINISHED"]
    assert ingest["FAILED"].info.run_id in lines[first] and ingest["FAILED"].data.tags["failure"].startswith("lost:")
    assert ingest["FINISHED"].data.metrics["openmoji.images"] > 0
    assert [r.info.status for r in runs if r.data.tags.get("kind") == "pipeline"] == ["FINISHED"]
    assert not [r for r in runs if r.info.status == "RUNNING"]


# --- a worker killed mid-stage ---------------------------------------------------------------------------------

def _origin(root: Path, s3: str) -> Path:
    """The team's repository (workers clone it): the ingest stage, the flows and deployments, an S3 DVC remote."""
    repo = dvc_repo.make_repo(root, _params(), stages=("ingest",))
    shutil.copytree(REPO / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", repo / "prefect.yaml")
    dvc_repo.run(repo, "git", "branch", "-M", "main")  # prefect.yaml's pull step clones main
    dvc_repo.dvc(repo, "remote", "add", "-d", "team", f"s3://{BUCKET}/dvc")
    dvc_repo.dvc(repo, "remote", "modify", "team", "endpointurl", s3)
    dvc_repo.commit(repo, "flows, deployments and the team remote")
    return repo


def _worker(env: dict, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--type", "process"],
                                env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_machine(worker: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the worker and everything it started, as a dead machine or container would: its process group,
    and the session of each flow run it started (Prefect 3.9's process worker gives each its own)."""
    procs = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
    groups = set()
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(proc.pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    worker.wait()
    psutil.wait_procs(procs, timeout=10)
    return procs


def _partial_objects(objects: dict[str, bytes]) -> list[str]:
    """Names of DVC 3 objects (``.../files/md5/ab/cdef...``, a directory's listing with ``.dir``) whose bytes
    do not hash to their name."""
    bad = []
    for name, content in objects.items():
        *_, prefix, rest = name.split("/")
        if hashlib.md5(content).hexdigest() != prefix + rest.removesuffix(".dir"):
            bad.append(name)
    return bad


def _cache_objects(repo: Path) -> dict[str, bytes]:
    root = repo / ".dvc" / "cache" / "files" / "md5"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()} \
        if root.is_dir() else {}


@pytest.mark.slow  # Prefect and S3 servers, two workers, a zombie found by its heartbeats: 80-102 s here
def test_worker_killed_mid_stage_is_retried_and_leaves_no_partial_object(tmp_path):
    """The pipeline's pools path (flows/remote.py's run_on_pools) runs the ingest stage on the cpu pool; its worker
    dies with the flow run mid-stage; the zombie automation marks the run Crashed, run_on_pools puts it back in
    the queue once, a new worker runs it to the end."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.remote import run_on_pools

    work = tmp_path / "work"  # the workers' temporary checkouts: what a killed one leaves stays in the test's tmp
    work.mkdir()
    marker = "worker-fault"
    query = f"tags.stage = 'ingest' and tags.pipeline_run = '{marker}'"
    store = MlflowClient()  # the tests' store, which the workers' stages log to
    with s3_server(tmp_path, BUCKET) as s3, prefect_server(tmp_path / "prefect-home", tmp_path / "server.log") as penv:
        origin = _origin(tmp_path / "origin", s3)
        env = {**penv, **S3_CREDENTIALS, **HEARTBEAT_ENV, "PYTHONPATH": _code_env(origin)["PYTHONPATH"],
               "AWS_ENDPOINT_URL": s3, "KNN_DIFFUSION_GIT_URL": str(origin), "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PREFECT_LOGGING_LEVEL": "WARNING", "TMPDIR": str(work)}
        for args in (["work-pool", "create", "cpu", "--type", "process"], ["--no-prompt", "deploy", "--name", "cpu"]):
            done = subprocess.run([str(BIN / "prefect"), *args], cwd=origin, env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # 45 s without a heartbeat (sent every 30 s) after the last one, and the run is marked Crashed.
        ensure_zombie_automation(env["PREFECT_API_URL"], within=45)
        workers = [_worker(env, tmp_path / "worker-1.log")]
        killed: list[bool] = []

        def kill_mid_stage() -> None:
            """As soon as the stage has opened its run: the machine dies; a new worker comes up."""
            deadline = time.monotonic() + 300
            while not [r for r in _runs(store, query) if r.info.status == "RUNNING"]:
                if time.monotonic() > deadline or workers[0].poll() is not None:
                    return
                time.sleep(0.1)
            _kill_machine(workers[0])
            killed.append(True)
            workers.append(_worker(env, tmp_path / "worker-2.log"))

        killer = threading.Thread(target=kill_mid_stage, daemon=True)
        killer.start()
        try:
            with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
                try:
                    run_on_pools(["ingest"], origin, {PIPELINE_RUN_ENV: marker})
                finally:
                    killer.join(timeout=310)
                    with get_client(sync_client=True) as client:
                        (flow_run,) = client.read_flow_runs()
                        history = client.read_flow_run_states(flow_run.id)
                    print("\nflow run states:", [(s.name, f"{s.timestamp:%H:%M:%S}", s.message) for s in history])
        finally:
            for worker in workers:
                if worker.poll() is None:
                    _kill_machine(worker)
        assert killed, "the stage never opened its run"
        # The same flow run twice: Crashed by the automation (no heartbeat), back in the queue, Completed.
        assert flow_run.state.is_completed() and flow_run.run_count == 2, flow_run.state
        crashed = [s for s in history if s.name == "Crashed"]
        assert crashed and "no heartbeat for 45 s" in crashed[0].message, [(s.name, s.message) for s in history]

        # One stage run per attempt: the killed one ended FAILED by the retry, which FINISHED.
        assert sorted(r.info.status for r in _runs(store, query)) == ["FAILED", "FINISHED"]

        # No partial object: in the bucket, in the killed attempt's cache, in the origin that pulls the run's outputs.
        bucket = s3_client(s3)
        keys = s3_keys(s3, BUCKET, "dvc/files/md5/")
        assert keys, "the retry pushed nothing"
        assert _partial_objects({k: bucket.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}) == []
        killed_checkouts = [p.parent.parent for p in work.glob("knn-diffusion-ingest-*/repo/.dvc")]
        assert killed_checkouts, sorted(p.name for p in work.iterdir())  # left behind by the killed attempt
        for checkout in killed_checkouts:
            assert _partial_objects(_cache_objects(checkout)) == [], checkout
        # run_on_pools adopted the stage's dvc.lock and metrics into the origin checkout: pull what they name.
        pulled = subprocess.run([str(BIN / "dvc"), "pull"], cwd=origin, env={**dvc_repo.env(origin), **S3_CREDENTIALS},
                                capture_output=True, text=True)
        assert pulled.returncode == 0, pulled.stdout[-3000:] + pulled.stderr[-3000:]
        assert _cache_objects(origin) and _partial_objects(_cache_objects(origin)) == []
        assert dvc_repo.status(origin) == {}
