"""`knn-diffusion stack up | down | status`: the team stack of docker/compose.yaml as local processes.

Everything lives in one data directory: the Postgres cluster, the S3 bucket's snapshot, Prefect's home,
the logs, `stack.json` (ports and the pid + start time of each process group `up` started) and
`stack.env` (what a shell sources to use the stack). `down` stops exactly the recorded groups."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from knn_diffusion.stack import services as sv
from knn_diffusion.stack.bucket import restore_bucket, snapshot_bucket
from knn_diffusion.stack.processes import (
    StackError,
    alive,
    answers,
    port_taken,
    start,
    started_at,
    stop_group,
    wait_until,
)
from knn_diffusion.stack.zombies import HEARTBEAT_ENV, ensure_zombie_automation

BUCKET = "knn-diffusion"  # as in docker/compose.yaml: s3://knn-diffusion/mlflow and s3://knn-diffusion/dvc
POOLS = ("cpu", "gpu")
SERVICES = ("postgres", "s3", "mlflow", "prefect", *(f"worker-{pool}" for pool in POOLS))
DEFAULT_PORTS = {"postgres": 5432, "s3": 9000, "mlflow": 5000, "prefect": 4200}


@dataclass
class StackSettings:
    data_dir: Path
    host: str = "127.0.0.1"
    ports: dict = field(default_factory=lambda: dict(DEFAULT_PORTS))
    processes: dict = field(default_factory=dict)  # service -> {"pid": ..., "start_time": ...}

    @property
    def state_file(self) -> Path:
        return self.data_dir / "stack.json"

    @property
    def env_file(self) -> Path:
        return self.data_dir / "stack.env"

    def url(self, service: str) -> str:
        return f"http://{self.host}:{self.ports[service]}"

    def save(self) -> None:
        state = {**asdict(self), "data_dir": str(self.data_dir)}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_file)

    def running(self, service: str) -> bool:
        record = self.processes.get(service)
        return bool(record) and alive(record["pid"], record["start_time"])


def load_settings(data_dir: Path) -> StackSettings | None:
    state_file = data_dir / "stack.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    return StackSettings(data_dir=data_dir, host=state["host"], ports=state["ports"], processes=state["processes"])


def client_env(s: StackSettings) -> dict[str, str]:
    """What a checkout needs to run against the stack (written to stack.env)."""
    return {"MLFLOW_TRACKING_URI": s.url("mlflow"), "PREFECT_API_URL": f"{s.url('prefect')}/api",
            **sv.S3_CREDENTIALS, "AWS_ENDPOINT_URL": s.url("s3"), "MLFLOW_S3_ENDPOINT_URL": s.url("s3"),
            "KNN_DIFFUSION_DVC_REMOTE": f"s3://{BUCKET}/dvc"}


def _ready(s: StackSettings, service: str) -> bool:
    if service == "postgres":
        return sv.postgres_ready(s.host, s.ports["postgres"])
    if service.startswith("worker-"):
        return s.running(service)
    probe = {"s3": "/moto-api/", "mlflow": "/health", "prefect": "/api/health"}[service]
    return answers(s.url(service) + probe)()


def _launch(s: StackSettings, service: str) -> None:
    """Start one service, wait until it answers, record its process group."""
    logs, host, ports = s.data_dir / "logs", s.host, s.ports
    prefect_home = s.data_dir / "prefect-home"
    if service == "postgres":
        sv.init_postgres(s.data_dir / "postgres" / "db")
        cmd, env, user = sv.postgres_cmd(s.data_dir / "postgres" / "db", host, ports["postgres"]), None, sv.pg_owner()
    elif service == "s3":
        cmd, env, user = sv.s3_cmd(host, ports["s3"]), None, None
    elif service == "mlflow":
        backend = sv.database_url(host, ports["postgres"], "mlflow")
        cmd, env, user = (sv.mlflow_cmd(host, ports["mlflow"], backend, f"s3://{BUCKET}/mlflow"),
                          sv.mlflow_env(s.url("s3")), None)
    elif service == "prefect":
        database = sv.database_url(host, ports["postgres"], "prefect", driver="asyncpg")
        cmd, env, user = (sv.prefect_cmd(host, ports["prefect"]),
                          sv.prefect_env(prefect_home, f"{s.url('prefect')}/api", database), None)
    else:
        env = {**sv.prefect_env(prefect_home, f"{s.url('prefect')}/api"), **client_env(s), **HEARTBEAT_ENV}
        cmd, user = sv.worker_cmd(service.removeprefix("worker-")), None
    proc = start(cmd, logs / f"{service}.log", env=env, user=user)
    s.processes[service] = {"pid": proc.pid, "start_time": started_at(proc.pid)}
    s.save()
    wait_until(lambda: _ready(s, service), proc, logs / f"{service}.log", service, seconds=240)
    if service == "postgres":
        for database in ("mlflow", "prefect"):
            sv.create_database(host, ports["postgres"], database)
    elif service == "s3":
        restore_bucket(s.url("s3"), BUCKET, s.data_dir / "s3")
    elif service == "prefect":  # flow runs of a dead worker are marked Crashed (the pipeline reruns its stages)
        try:
            ensure_zombie_automation(f"{s.url('prefect')}/api")
        except Exception as err:
            raise StackError(f"prefect server at {s.url('prefect')}: could not add the zombie-run automation: "
                             f"{' '.join(str(err).split())[:300]}") from err


def up(data_dir: Path, host: str = "127.0.0.1", ports: dict | None = None) -> StackSettings:
    """Start what is not running yet (idempotent); refuse before starting anything if a port is taken."""
    data_dir = data_dir.resolve()
    previous = load_settings(data_dir)
    s = previous or StackSettings(data_dir=data_dir, host=host)
    if previous and any(previous.running(name) for name in SERVICES):
        wanted = {**s.ports, **(ports or {})}
        if (host, wanted) != (s.host, s.ports):
            raise StackError(f"{data_dir}: the stack runs on {s.host} with ports {s.ports}; "
                             "`knn-diffusion stack down` first to change them")
    s.host, s.ports = host, {**s.ports, **(ports or {})}
    for service, port in s.ports.items():
        if not s.running(service) and port_taken(s.host, port):
            raise StackError(f"port {port} on {s.host} ({service}) is already in use; pick another with "
                             f"--{service}-port (nothing was started)")
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    if sv.pg_owner():
        _check_reachable_by(sv.pg_owner(), data_dir)
    launched = []
    try:
        for service in SERVICES:
            if not s.running(service):
                launched.append(service)
                _launch(s, service)
    except BaseException:  # nothing half-started: stop what this call started
        for service in reversed(launched):
            if s.running(service):
                stop_group(s.processes.pop(service)["pid"])
        s.save()
        raise
    write_env_file(s)
    return s


def _check_reachable_by(user: str, path: Path) -> None:
    import pwd

    uid = pwd.getpwnam(user).pw_uid
    for parent in (path, *path.parents):
        st = parent.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            raise StackError(f"--data-dir {path}: {parent} is not searchable by the '{user}' user that runs "
                             "Postgres; choose a data directory outside it (e.g. under /srv or /tmp)")


def write_env_file(s: StackSettings) -> None:
    lines = [f"export {key}={shlex.quote(value)}" for key, value in client_env(s).items()]
    s.env_file.write_text("# Written by `knn-diffusion stack up`; source it: . " + shlex.quote(str(s.env_file)) +
                          "\n" + "\n".join(lines) + "\n")


def down(data_dir: Path) -> list[str]:
    """Stop the recorded process groups, newest first; the bucket is saved to disk before S3 stops."""
    s = load_settings(data_dir.resolve())
    if s is None:
        return []
    stopped = []
    for service in reversed(SERVICES):
        if not s.running(service):
            continue
        if service == "s3":
            snapshot_bucket(s.url("s3"), BUCKET, s.data_dir / "s3")
        stop_group(s.processes[service]["pid"])
        stopped.append(service)
    s.processes = {}
    s.save()
    return stopped


def status(data_dir: Path) -> list[tuple[str, str, str]]:
    """(service, address, health) rows: healthy, not answering, or stopped."""
    s = load_settings(data_dir.resolve())
    if s is None:
        return [(service, "-", "stopped") for service in SERVICES]
    rows = []
    for service in SERVICES:
        address = f"{s.host}:{s.ports[service]}" if service in s.ports else f"pool {service.removeprefix('worker-')}"
        health = "stopped" if not s.running(service) else "healthy" if _ready(s, service) else "not answering"
        rows.append((service, address, health))
    return rows
