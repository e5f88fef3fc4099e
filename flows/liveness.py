"""Whether a process recorded earlier still runs: a dead sweep is resumed, a live one is left alone.

A pid alone may have been reused by another process since, so a sweep records itself as
``host:pid:start time`` (:func:`process_tag`); DVC's queue records a bare pid (:func:`pid_alive`).
"""

from __future__ import annotations

import socket

import psutil


def process_tag() -> str:
    """This process as ``host:pid:start time``."""
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{int(me.create_time())}"


def process_alive(tag: str) -> bool:
    """Whether the process of a :func:`process_tag` still runs; one on another host counts as gone."""
    host, pid, started = (tag.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        return int(psutil.Process(int(pid)).create_time()) == int(started or 0)
    except psutil.Error:
        return False


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        return bool(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
