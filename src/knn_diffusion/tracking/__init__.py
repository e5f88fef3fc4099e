"""One MLflow run per stage execution: params, git commit, input hashes, metrics, artifacts.

The store defaults to ``sqlite:///<repo>/mlflow.db`` (``$MLFLOW_TRACKING_URI`` or
``tracking.tracking_uri`` override it). Each stage is its own process, so the fluent API is safe
here; sqlite's "database is locked" under concurrent stages is retried.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

from knn_diffusion.tracking.server import TrackingUnavailable, end_active_run, server_errors

T = TypeVar("T")

PIPELINE_RUN_ENV = "KNN_DIFFUSION_PIPELINE_RUN"  # set by the Prefect flow to group a run's stages
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"  # set by DVC in a queued experiment: groups its stages otherwise
# Nesting, set by the flows: a stage's run is the child of its sweep trial's run (looked up by the DVC
# experiment it runs in), else of the pipeline run's. The Prefect flow run's URL tags every run.
PARENT_RUN_ENV = "KNN_DIFFUSION_PARENT_RUN"
TRIAL_RUNS_ENV = "KNN_DIFFUSION_TRIAL_RUNS"  # JSON {DVC experiment name: MLflow trial run id}
FLOW_RUN_URL_ENV = "KNN_DIFFUSION_FLOW_RUN_URL"
# On a training stage's run: the content hash of the model folder it wrote. The folder itself names no run
# (its bytes depend only on its inputs, so DVC finds a retrained model unchanged and its run cache restores it).
MODEL_HASH_TAG = "model.sha256"


def repo_root(start: Path | None = None) -> Path:
    """The directory holding dvc.yaml/params.yaml (DVC runs stages from there)."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".git").exists():
            return candidate
    return here


def tracking_uri(configured: str = "", root: Path | None = None) -> str:
    """An exported ``MLFLOW_TRACKING_URI``, else ``configured`` (tracking.tracking_uri), else the repo's
    sqlite store."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if configured:
        return configured
    return f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def quiet_artifact_downloads() -> None:
    """Reports read one small score file per evaluated point, hundreds per study: MLflow's progress bar per
    download would bury their output. An exported ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` still wins."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def with_retries(fn: Callable[[], T], attempts: int = 8) -> T:
    """Retry sqlite lock contention between concurrently running stages."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # mlflow wraps sqlalchemy's OperationalError in several types
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


def git_commit(root: Path) -> tuple[str, bool]:
    """(commit sha, dirty) or ('unknown', False) outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return sha, dirty
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", False


def experiment_id_for(name: str, client: Any = None) -> str:
    """Get or create an experiment; two stages creating it at once must land in the same one."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # lost the race: the other process created it
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class StageRun:
    """Handle returned by :func:`stage_run`; thin wrappers that keep stage code short."""

    def __init__(self, run: Any):
        self.run = run
        self.id = run.info.run_id

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in values.items() if v is not None}
        with_retries(lambda: mlflow.log_metrics(clean, step=step))

    def tags(self, values: dict[str, str]) -> None:
        import mlflow

        with_retries(lambda: mlflow.set_tags(values))

    def image(self, array: np.ndarray, name: str) -> None:
        import mlflow

        with_retries(lambda: mlflow.log_image(array, name))

    def artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        import mlflow

        with_retries(lambda: mlflow.log_artifact(str(path), folder))

    def table(self, rows: list[dict], name: str) -> None:
        import mlflow
        import pandas as pd

        with_retries(lambda: mlflow.log_table(pd.DataFrame(rows), name))

    def text(self, text: str, name: str) -> None:
        import mlflow

        with_retries(lambda: mlflow.log_text(text, name))


def model_run_id(model_dir: str | os.PathLike, experiment: str, configured_uri: str = "") -> str:
    """The MLflow run that trained the model in ``model_dir``: the latest finished run tagged with its
    content hash (:data:`MODEL_HASH_TAG`; for a model DVC restored, the run that made those bytes), ''
    when the store holds none (e.g. a model pulled from a DVC remote into a fresh store)."""
    from mlflow import MlflowClient

    from knn_diffusion.io import content_sha256

    client = MlflowClient(tracking_uri(configured_uri))
    found = with_retries(lambda: client.get_experiment_by_name(experiment))
    if found is None:
        return ""
    runs = with_retries(lambda: client.search_runs(
        [found.experiment_id], f"tags.`{MODEL_HASH_TAG}` = '{content_sha256(model_dir)}' and "
        "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1))
    return runs[0].info.run_id if runs else ""


def parent_run_id() -> str | None:
    """The run a stage's run nests under: its sweep trial's (by DVC experiment name), else the pipeline's."""
    trials = json.loads(os.environ.get(TRIAL_RUNS_ENV) or "{}")
    return trials.get(os.environ.get(DVC_EXP_NAME_ENV, "")) or os.environ.get(PARENT_RUN_ENV) or None


class GroupRun:
    """A grouping run made by :func:`group_run`: ``id``, :meth:`fail` to end it FAILED with a reason, and
    :meth:`finish` to end it FINISHED before its block does."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.id, self.failure, self.finished = client, run_id, "", False

    def fail(self, reason: str) -> None:
        self.failure = reason
        with_retries(lambda: self.client.set_tag(self.id, "failure", reason[:5000]))

    def finish(self) -> None:
        """End the run FINISHED now (a sweep trial that is done while others run): it stays so."""
        with_retries(lambda: self.client.set_terminated(self.id, "FINISHED"))
        self.finished = True


def end_stale_descendants(client: Any, experiment_id: str, run_id: str, status: str = "KILLED") -> list[str]:
    """End every RUNNING run nested (at any depth) under ``run_id`` with ``status``; returns their ids.

    For a group run reopened after its process died: runs it left RUNNING will never end by themselves.
    """
    ended, frontier = [], [run_id]
    while frontier:
        query = f"tags.`mlflow.parentRunId` = '{frontier.pop()}'"
        children = with_retries(lambda: client.search_runs([experiment_id], query, max_results=50_000))
        frontier += [c.info.run_id for c in children]
        for child in children:
            if child.info.status == "RUNNING":
                with_retries(lambda c=child: client.set_terminated(c.info.run_id, status))
                ended.append(child.info.run_id)
    return ended


@contextlib.contextmanager
def group_run(name: str, experiment: str, uri: str, *, params: Any = None, tags: dict[str, str] | None = None,
              parent: str | None = None, resume: str | None = None) -> Iterator[GroupRun]:
    """A run that groups others (a pipeline run, a sweep, a sweep trial).

    Made with ``MlflowClient`` against ``uri`` (no active fluent run: flows are threaded), nested under
    ``parent`` when given; ends FINISHED, or FAILED when the block raises or calls ``fail``. ``params``
    (a mapping or the Params dataclass) are logged flattened, so the UI's compare view shows them beside
    the children's metrics. ``resume``: the id of an earlier run of the same group (a killed sweep's) to
    reopen instead of creating one: RUNNING again, its ``failure`` tag gone, its tags updated.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    from knn_diffusion.config_fields import flatten

    client = MlflowClient(uri)
    experiment_id = with_retries(lambda: experiment_id_for(experiment, client))
    run_tags = {k: v for k, v in (tags or {}).items() if v}
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    if resume:
        run = GroupRun(client, resume)
        with_retries(lambda: client.log_batch(resume, tags=[RunTag(k, v) for k, v in run_tags.items()]))
        if "failure" in with_retries(lambda: client.get_run(resume)).data.tags:
            with_retries(lambda: client.delete_tag(resume, "failure"))
        with_retries(lambda: client.update_run(resume, status="RUNNING"))
    else:
        run = GroupRun(client, with_retries(lambda: client.create_run(experiment_id, run_name=name,
                                                                      tags=run_tags)).info.run_id)
    flat = [Param(k, str(v)[:6000]) for k, v in flatten(params or {}).items()]
    for i in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
        with_retries(lambda chunk=flat[i:i + 100]: client.log_batch(run.id, params=chunk))
    try:
        yield run
    except BaseException as err:
        if not run.finished:
            if not run.failure:
                run.fail(f"{type(err).__name__}: {err}")
            with_retries(lambda: client.set_terminated(run.id, "FAILED"))
        raise
    if not run.finished:
        with_retries(lambda: client.set_terminated(run.id, "FAILED" if run.failure else "FINISHED"))


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], experiment: str = "knn-diffusion",
              configured_uri: str = "", tags: dict[str, str] | None = None,
              run_name: str | None = None) -> Iterator[StageRun]:
    """Open the MLflow run for one stage execution and tag it for traceability (git, pipeline run, ``tags``);
    the run is named ``run_name`` (default: the stage). It ends FINISHED, or FAILED when the block raises;
    a tracking server that stops answering makes it raise :class:`TrackingUnavailable` (one line)."""
    import mlflow

    from knn_diffusion.config_fields import flatten

    root = repo_root()
    uri = tracking_uri(configured_uri)
    mlflow.set_tracking_uri(uri)
    with server_errors(uri, f"as stage '{stage}' opened its run"):
        experiment_id = with_retries(lambda: experiment_id_for(experiment))
        sha, dirty = git_commit(root)
        run_tags = {"stage": stage, "git.commit": sha, "git.dirty": str(dirty),
                    "pipeline_run": os.environ.get(PIPELINE_RUN_ENV) or os.environ.get(DVC_EXP_NAME_ENV, ""),
                    "dvc.experiment": os.environ.get(DVC_EXP_NAME_ENV, ""),
                    "prefect.flow_run_url": os.environ.get(FLOW_RUN_URL_ENV, ""), **(tags or {})}
        end_lost_attempts(mlflow.MlflowClient(), experiment_id, run_name or stage, run_tags, parent_run_id())
        run = with_retries(lambda: mlflow.start_run(experiment_id=experiment_id, run_name=run_name or stage,
                                                    tags=run_tags, parent_run_id=parent_run_id()))
    with _ends_active_run(uri, f"while stage '{stage}' logged to run {run.info.run_id}"):
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            with_retries(lambda chunk=dict(items[i:i + 100]): mlflow.log_params(chunk))
        yield StageRun(run)


@contextlib.contextmanager
def _ends_active_run(uri: str, doing: str) -> Iterator[None]:
    """End the active run when the block ends: FINISHED, or FAILED when it raises. When the tracking server
    stops answering, the block raises :class:`TrackingUnavailable` and the run gets one quick try to end."""
    import mlflow

    try:
        with server_errors(uri, doing):
            yield
    except TrackingUnavailable:
        end_active_run("FAILED")
        raise
    except BaseException:
        with server_errors(uri, doing):
            with_retries(lambda: mlflow.end_run(status="FAILED"))
        raise
    with server_errors(uri, doing):
        with_retries(lambda: mlflow.end_run(status="FINISHED"))


def end_lost_attempts(client: Any, experiment_id: str, run_name: str, tags: dict[str, str],
                      parent: str | None) -> list[str]:
    """End FAILED the runs of earlier attempts of this stage in this pipeline run that are still RUNNING (and the
    runs nested under them); returns their ids.

    A pipeline run (or a DVC experiment) runs a stage one attempt at a time, so an attempt still RUNNING when
    the next one starts lost its tracking server or its process (a killed worker) before it could end its run.
    Without a ``pipeline_run`` tag nothing tells another user's run of the same stage from a lost one: none
    is touched.
    """
    marker = tags.get("pipeline_run")
    if not marker:
        return []
    query = (f"attributes.status = 'RUNNING' and attributes.run_name = '{run_name}' "
             f"and tags.pipeline_run = '{marker}'")
    found = with_retries(lambda: client.search_runs([experiment_id], query, max_results=100))
    lost = [r.info.run_id for r in found if r.data.tags.get("mlflow.parentRunId") == parent]
    for run_id in lost:
        end_stale_descendants(client, experiment_id, run_id, "FAILED")
        with_retries(lambda r=run_id: client.set_tag(r, "failure", "lost: the attempt never ended its run (its "
                                                     "tracking server or its process went away); a later one did"))
        with_retries(lambda r=run_id: client.set_terminated(r, "FAILED"))
    return lost


@contextlib.contextmanager
def child_run(name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> Iterator[StageRun]:
    """A run nested under the active stage run (one per evaluated setting, say), carrying the parent's
    tags (stage, git commit, DVC input hashes, pipeline run) so it can be traced on its own."""
    import mlflow

    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError(f"child_run('{name}') outside a stage run")
    parent_tags = with_retries(lambda: mlflow.get_run(parent.info.run_id)).data.tags
    inherited = {k: v for k, v in parent_tags.items() if not k.startswith("mlflow.")}
    run = with_retries(lambda: mlflow.start_run(experiment_id=parent.info.experiment_id, run_name=name, nested=True,
                                                tags={**inherited, **(tags or {})}))
    with _ends_active_run(mlflow.get_tracking_uri(), f"while run {run.info.run_id} ({name}) logged"):
        with_retries(lambda: mlflow.log_params({k: str(v)[:6000] for k, v in params.items()}))
        yield StageRun(run)
