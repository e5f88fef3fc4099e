"""DVC invocation: the environment every DVC subprocess of the flows gets, ``dvc repro`` of one stage as a
Prefect task, and the queue and experiment listings a sweep reads.

The CLI is DVC's stable interface (``Repo.reproduce`` is internal and holds the repo lock), so the flows
run ``.venv/bin/dvc`` as a subprocess and parse what it prints.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from knn_diffusion.stages.common import THREADS_ENV, threads_per_process
from knn_diffusion.tracking import git_commit

DVC = str(Path(sys.executable).parent / "dvc")
TRANSIENT_MARKERS = ("Unable to acquire lock", "database is locked", "Resource temporarily unavailable")
SHOW_ATTEMPTS, SHOW_RETRY_SECONDS = 3, 2.0  # dvc_experiments: a read racing a queue worker
# A stage's one line when its MLflow server stops answering (knn_diffusion.tracking.server): retried once it is back.
TRACKING_DOWN = re.compile(r"MLflow tracking server at (\S+) is unreachable")
TRACKING_WAIT_ENV = "KNN_DIFFUSION_TRACKING_WAIT"  # seconds a retry waits for that server (default 600)


class StageFailed(RuntimeError):
    """A stage exited non-zero for a reason retrying will not fix."""


class TransientStageError(RuntimeError):
    """A stage failed for a reason that may pass (lock contention, I/O hiccup)."""


def stage_env(run_env: dict[str, str] | None = None, side_by_side: int = 1) -> dict[str, str]:
    """Environment for a DVC subprocess: this venv's ``python`` first, ``run_env`` (what the stages' MLflow
    runs are grouped and nested by: tracking.PIPELINE_RUN_ENV, PARENT_RUN_ENV, FLOW_RUN_URL_ENV), and the
    torch threads of each of the ``side_by_side`` stage processes the caller runs at once (cores / N)."""
    env = {**os.environ, **(run_env or {})}
    # DVC stages call `python`; make that the interpreter running this flow (the project venv).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # ...and let it import the checkout's own code, the code DVC hashes as the stage's deps: a worker's
    # clone (or a queued experiment's copy) runs its revision, not whatever version is installed. Relative
    # on purpose: each Python resolves it against the directory it starts in, the stage's workspace.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, ["src", env.get("PYTHONPATH", "")]))
    env[THREADS_ENV] = str(threads_per_process(side_by_side))
    env.setdefault("TQDM_MININTERVAL", "10")  # output is piped: fewer, longer-spaced progress lines
    return env


def tracking_server_back(url: str, seconds: float | None = None) -> bool:
    """Wait until the MLflow server at ``url`` answers its ``/health`` (True) or ``seconds`` have passed (False;
    default ``$KNN_DIFFUSION_TRACKING_WAIT`` or 600)."""
    seconds = float(os.environ.get(TRACKING_WAIT_ENV) or 600) if seconds is None else seconds
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
        time.sleep(1)


def _retry_only_transient(task, task_run, state) -> bool:
    """Retry a transient failure; one of a tracking server that stopped answering once the server is back."""
    try:
        state.result()
    except TransientStageError as err:
        down = TRACKING_DOWN.search(str(err))
        if not down:
            return True
        try:
            logger = get_run_logger()
        except Exception:  # no run context
            logger = logging.getLogger(__name__)
        logger.warning("waiting for the MLflow tracking server at %s to answer again, then retrying", down.group(1))
        return tracking_server_back(down.group(1))
    except Exception:
        return False
    return False


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_only_transient,
      task_run_name="dvc repro {stage}")
def run_stage(stage: str, repo: str, run_env: dict[str, str], force: bool = False, side_by_side: int = 1) -> str:
    """Reproduce one stage through DVC, one of ``side_by_side`` running at once (:func:`stage_env`),
    streaming its output; returns the tail of that output."""
    logger = get_run_logger()
    cmd = [DVC, "repro", "--single-item", stage]
    if force:
        cmd.append("--force")
    logger.info("%s (in %s)", " ".join(cmd[1:]), repo)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, cwd=repo, env=stage_env(run_env, side_by_side), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line.rstrip())
    output = "\n".join(tail)
    if proc.returncode != 0:
        transient = any(m in output for m in TRANSIENT_MARKERS) or TRACKING_DOWN.search(output)
        kind = TransientStageError if transient else StageFailed
        raise kind(f"stage '{stage}' failed (exit {proc.returncode}); last output:\n{output}")
    return output


def dvc(repo: Path, env: dict[str, str], *args: str, check: bool = True,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """``dvc *args`` in ``repo``, its output captured; ``check``: raise with its stderr when it fails;
    ``timeout``: kill it after that many seconds (``subprocess.TimeoutExpired``)."""
    # Output through files, not pipes: the queue workers `dvc queue start` leaves running inherit them, and
    # reading a pipe to its end would wait for those workers to exit (for the whole queue).
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run([DVC, *args], cwd=repo, env=env, stdout=out, stderr=err, timeout=timeout).returncode
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(args, code, out.read(), err.read())
    if check and done.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done


def queue_status(repo: Path, env: dict[str, str], timeout: float | None = None) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from ``dvc queue status``; ``timeout`` as in
    :func:`dvc`."""
    rows = dvc(repo, env, "queue", "status", timeout=timeout).stdout.splitlines()
    status = {}
    for row in rows[1:]:
        fields = row.split()
        if len(fields) >= 4 and not row.startswith("Worker"):
            status[fields[1]] = fields[-1]
    return status


def dvc_experiments(repo: Path, env: dict[str, str], timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """What DVC knows of the experiments of HEAD, by name (``dvc exp show``, ``dvc exp list``).

    ``succeeded``: an experiment of that name is committed (its results are in ``dvc exp show``);
    ``params``: its params.yaml; ``deps``: {path: DVC hash} of its stages' deps; ``running``: the pid and
    working copy of a queue task of that name that DVC reports as running (its worker may have died with
    a killed sweep: DVC keeps saying "Running" until ``dvc queue kill``). ``timeout``: per dvc command.
    It is asked up to SHOW_ATTEMPTS times: ``dvc exp show`` fails when a queue worker deletes a finished task's
    files while it reads them (seen in CI), and answers a moment later.
    """
    for _ in range(SHOW_ATTEMPTS - 1):
        try:
            return _experiments_now(repo, env, timeout)
        except RuntimeError:
            time.sleep(SHOW_RETRY_SECONDS)
    return _experiments_now(repo, env, timeout)


def _experiments_now(repo: Path, env: dict[str, str], timeout: float | None) -> dict[str, dict[str, Any]]:
    committed = set(dvc(repo, env, "exp", "list", "--name-only", timeout=timeout).stdout.split())
    shown = json.loads(dvc(repo, env, "exp", "show", "--json", timeout=timeout).stdout or "[]")
    return experiments_of(shown, git_commit(repo)[0], committed)


def experiments_of(shown: list[dict], head: str, committed: set[str]) -> dict[str, dict[str, Any]]:
    """:func:`dvc_experiments` from the parsed ``dvc exp show --json`` and ``dvc exp list`` output."""
    found: dict[str, dict[str, Any]] = {}
    for entry in shown:
        if entry.get("rev") != head:
            continue
        for exp in entry.get("experiments") or []:
            executor = exp.get("executor") or {}
            info = found.setdefault(exp["name"], {"succeeded": exp["name"] in committed, "running": None})
            if executor.get("state") == "running":
                local = executor.get("local") or {}
                info["running"] = {"pid": local.get("pid"), "root": local.get("root")}
            elif exp["name"] in committed and executor.get("state") in (None, "success"):
                data = exp["revs"][0]["data"]
                info["params"] = ((data.get("params") or {}).get("params.yaml") or {}).get("data", {})
                info["deps"] = {path: dep["hash"] for path, dep in (data.get("deps") or {}).items() if dep.get("hash")}
    return found
