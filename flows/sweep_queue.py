"""A sweep's trials through DVC's experiment queue: queue them, start the workers, wait for the queue, and
clean up after a worker that died.

Each trial is queued with ``dvc exp run --queue --pull``: it runs in a copy of the workspace under
``.dvc/tmp/exps`` and pulls what it lacks (the baseline's outputs) from the default DVC remote instead of
recomputing it, so a fresh worker reruns only what its params change.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.dvc_cli import dvc, dvc_experiments, queue_status
from flows.liveness import pid_alive

POLL_SECONDS = 3
SHOW_TIMEOUT_SECONDS = 120
# `dvc queue status` answers in a second or two; in CI it once never answered after a worker had been killed,
# and the sweep waited on it until the test's timeout.
STATUS_TIMEOUT_SECONDS = 60
FINISHED = {"Success", "Failed"}


def stop_dead_task(repo: Path, env: dict[str, str], name: str, dead: dict) -> None:
    """A task DVC reports "Running" whose process is gone: ``dvc queue kill`` (DVC marks it failed), and its
    working copy under .dvc/tmp/exps removed."""
    dvc(repo, env, "queue", "kill", name, check=False)
    root = Path(dead["root"] or repo).resolve()
    if root.is_relative_to((repo / ".dvc" / "tmp" / "exps").resolve()):
        shutil.rmtree(root, ignore_errors=True)


class DeadTasks:
    """Tasks DVC reports "Running" whose process is gone at two checks in a row. One check is not enough: between
    an experiment's process ending and its worker collecting the result and marking it done DVC still says
    "Running" for a few seconds, and removing the working copy then would fail a finished trial."""

    def __init__(self) -> None:
        self.suspects: set[str] = set()

    def confirm(self, running: dict[str, dict]) -> dict[str, dict]:
        """``running``: {name: {"pid", "root"}} of the tasks still reported running; returns those dead twice."""
        gone = {name: task for name, task in running.items() if not pid_alive(task["pid"])}
        confirmed = {name: task for name, task in gone.items() if name in self.suspects}
        self.suspects = set(gone) - set(confirmed)
        return confirmed


def remote_for_experiments(repo: Path, env: dict[str, str]) -> str:
    """The default DVC remote as the queued experiments will see it ('' when none is configured).

    Its URL as .dvc/config holds it may be relative (the project's ``../.dvcstore``), which a copy under
    .dvc/tmp/exps resolves inside itself; DVC copies the workspace's .dvc/config.local into each copy, so
    a local path is pinned there, absolute (config.local is git-ignored)."""
    name = dvc(repo, env, "remote", "default", check=False).stdout.strip()
    if not name:
        return ""
    rows = [line.split() for line in dvc(repo, env, "remote", "list").stdout.splitlines()]
    listed = {row[0]: row[1] for row in rows if len(row) >= 2}
    url = listed.get(name, "")
    if url and "://" not in url:  # DVC lists a local remote's path resolved against its config file
        dvc(repo, env, "remote", "modify", "--local", name, "url", url)
    return url


@task(cache_policy=NO_CACHE, task_run_name="queue {name}")
def queue_experiment(repo: Path, env: dict[str, str], name: str, overrides: list[str], dead: dict | None = None,
                     pull: bool = True, targets: tuple[str, ...] = ()) -> str:
    """Queue one combination; an experiment (or finished queue task) of the same name is replaced, and a
    ``dead`` task of that name (its worker died with a killed sweep) is killed and its working copy removed.
    ``pull``: the experiment pulls missing outputs from the default remote rather than recompute them.
    ``targets``: the stages it reproduces (with what they need upstream); empty: all of them."""
    logger = get_run_logger()
    if dead:
        logger.info("'%s' was left running by a dead worker (pid %s): dvc queue kill", name, dead["pid"])
        stop_dead_task(repo, env, name, dead)
    if name in dvc(repo, env, "exp", "list", "--name-only").stdout.split():
        logger.info("replacing the existing experiment '%s'", name)
        dvc(repo, env, "exp", "remove", name)
    dvc(repo, env, "queue", "remove", name, check=False)  # a finished task of an earlier sweep
    dvc(repo, env, "exp", "run", "--queue", *(["--pull"] if pull else []), "-n", name,
        *itertools.chain.from_iterable(("-S", o) for o in overrides), *targets)
    return name


def running_tasks(repo: Path, env: dict[str, str], reported: dict[str, str]) -> dict[str, dict]:
    """{name: {"pid", "root"}} of the experiments reported "Running" that DVC has a running task for; none when
    ``dvc exp show`` does not answer in SHOW_TIMEOUT_SECONDS (seen once in a study: it hung while queue workers
    collected experiments, and the sweep waited on it for an hour after the last trial had finished) or fails
    (seen in CI: it read a task's .run file as its worker was deleting it). The check waits for the next round."""
    try:
        known = dvc_experiments(repo, env, timeout=SHOW_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        get_run_logger().warning("dvc exp show did not answer in %d s: the dead-worker check waits for the next "
                                 "round", SHOW_TIMEOUT_SECONDS)
        return {}
    except RuntimeError as failed:  # dvc() raises it with DVC's stderr, whose "ERROR:" line is not ours to print
        reason = next((line.split("ERROR: ", 1)[1] for line in str(failed).splitlines() if "ERROR: " in line),
                      str(failed).splitlines()[0])
        get_run_logger().warning("listing DVC's experiments failed while workers were collecting them (%s): the "
                                 "dead-worker check waits for the next round", reason[:200])
        return {}
    return {name: known[name]["running"] for name, state in reported.items()
            if state == "Running" and known.get(name, {}).get("running")}


@task(cache_policy=NO_CACHE)
def run_queue(repo: Path, env: dict[str, str], names: list[str], jobs: int,
              on_success: Callable[[str], None] = lambda name: None) -> dict[str, str]:
    """Start ``jobs`` queue workers and wait until every experiment in ``names`` has finished; ``on_success``
    is called with each experiment's name as soon as it has succeeded. A task whose process died (its
    worker killed) fails, and workers are started again, so a lost worker never leaves the sweep waiting."""
    logger = get_run_logger()
    dvc(repo, env, "queue", "start", "-j", str(jobs))
    reported: dict[str, str] = {}
    dead_tasks = DeadTasks()
    polls = 0
    while True:
        polls += 1
        if polls % 10 == 0 and "Running" in reported.values():  # about every 30 s
            running = running_tasks(repo, env, reported)
            for name, task in dead_tasks.confirm(running).items():
                logger.warning("%s: its process (pid %s) died", name, task["pid"])
                stop_dead_task(repo, env, name, task)
                dvc(repo, env, "queue", "start", "-j", str(jobs))
        try:
            status = queue_status(repo, env, timeout=STATUS_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:  # killed, so it holds no lock of DVC's or celery's when asked again
            logger.warning("dvc queue status did not answer in %d s: asking again", STATUS_TIMEOUT_SECONDS)
            continue
        for name in names:
            if status.get(name) != reported.get(name):
                logger.info("%s: %s", name, status.get(name, "?"))
                if status.get(name) == "Success":
                    on_success(name)
        reported = {name: status.get(name, "?") for name in names}
        if all(state in FINISHED for state in reported.values()):
            return reported
        if not any(state in ("Queued", "Running") for state in reported.values()):
            raise RuntimeError(f"experiments neither queued, running nor finished: {reported}")
        time.sleep(POLL_SECONDS)
