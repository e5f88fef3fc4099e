"""Server processes on loopback: start each in its own process group, wait until it answers, stop the whole
group. Servers fork helpers (MLflow's gunicorn workers, a Prefect worker's flow runs), so a pid alone is
not enough to stop what was started; a recorded start time tells a live process from a reused pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator


class StackError(RuntimeError):
    """A server that cannot start or answer: one line for the user."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(host: str, port: int) -> bool:
    """True when something already listens on (or holds) host:port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def answers(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            return False
    return ready


def as_user(user: str | None) -> dict:
    """Popen arguments that run the command as ``user`` when we are root (Postgres refuses to run as root).
    The process itself switches user, with no wrapper such as runuser in between: the recorded pid is the
    server's own, so a crash of the server (not of a wrapper) is what `stack status` sees."""
    if not user or os.geteuid() != 0:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def start(cmd: list[str], log: Path, env: dict | None = None, user: str | None = None) -> subprocess.Popen:
    """Start ``cmd`` detached in a new session (its pid is its process group id), output appended to ``log``."""
    with open(log, "a") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True, **as_user(user))


def started_at(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def alive(pid: int, start_time: int | None) -> bool:
    return start_time is not None and started_at(pid) == start_time


def stop_group(pgid: int, grace: float = 30) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pgid, os.WNOHANG)  # reap it when it is our child
            if not _group_alive(pgid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # A zombie leader keeps the group "alive" to killpg; look for a live member instead.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            fields = text[text.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            raise StackError(f"{what} did not come up (exit {proc.poll()}); see {log}, which ends: "
                             f"{lines[-1] if lines else '(empty)'}")
        time.sleep(0.5)


@contextlib.contextmanager
def background(cmd: list[str], log: Path, env: dict | None = None,
               user: str | None = None) -> Iterator[subprocess.Popen]:
    """``cmd`` running for the duration of the block, its whole process group stopped after."""
    log.write_text("")
    proc = start(cmd, log, env=env, user=user)
    try:
        yield proc
    finally:
        stop_group(proc.pid)
        proc.wait()
