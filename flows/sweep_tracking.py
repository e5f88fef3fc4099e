"""A sweep in MLflow: its store, the earlier run of the same sweep to resume, its trial runs, and the
ablation report logged to its parent run."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.liveness import process_alive
from flows.sweep_plan import SweepBusy
from knn_diffusion.config import load_params
from knn_diffusion.tracking import tracking_uri, with_retries

SWEEP_IDENTITY = ("sweep.prefix", "sweep.axes", "sweep.workspace")  # with git.commit: what a rerun must match


def sweep_tracking_uri(repo: Path) -> str:
    """The store every queued stage logs to: exported URI, then params' tracking.tracking_uri, then the repo's."""
    configured = load_params(repo / "params.yaml").tracking.tracking_uri
    return tracking_uri(configured, root=repo)


def workspace_changes(repo: Path) -> str:
    """A hash of the uncommitted changes to tracked files (queued experiments run with them), '' when clean."""
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=repo, capture_output=True, check=True).stdout
    return hashlib.sha256(diff).hexdigest()[:16] if diff else ""


def earlier_sweep(client: Any, experiment_id: str, tags: dict[str, str]) -> Any | None:
    """The latest parent run of this same sweep (prefix, axes, git commit and uncommitted changes), unless
    its process still runs."""
    runs = with_retries(lambda: client.search_runs(
        [experiment_id], f"tags.kind = 'sweep' and tags.`git.commit` = '{tags['git.commit']}'",
        order_by=["attributes.start_time DESC"], max_results=1000))
    same = [r for r in runs if all(r.data.tags.get(k, "") == tags[k] for k in SWEEP_IDENTITY)]
    if not same:
        return None
    latest = same[0]
    if latest.info.status == "RUNNING" and process_alive(latest.data.tags.get("sweep.process", "")):
        raise SweepBusy(f"sweep '{tags['sweep.prefix']}' is still running (process "
                        f"{latest.data.tags['sweep.process']}, MLflow run {latest.info.run_id}): wait for it to end")
    return latest


def trial_runs(client: Any, experiment_id: str, parent_id: str) -> dict[str, Any]:
    """{DVC experiment name: its latest trial run} under a sweep's parent run."""
    runs = with_retries(lambda: client.search_runs(
        [experiment_id], f"tags.kind = 'trial' and tags.`mlflow.parentRunId` = '{parent_id}'",
        order_by=["attributes.start_time ASC"], max_results=50_000))
    return {run.data.tags.get("dvc.experiment", run.info.run_name): run for run in runs}


@task(cache_policy=NO_CACHE)
def prepare_store(uri: str, experiment: str) -> str:
    """Create the MLflow store's schema and the experiment once, before runs write to it concurrently."""
    import mlflow

    from knn_diffusion.tracking import experiment_id_for

    mlflow.set_tracking_uri(uri)
    return with_retries(lambda: experiment_id_for(experiment))


@task(cache_policy=NO_CACHE)
def write_sweep_report(repo: Path, uri: str, experiment: str, names: list[str], prefix: str, run_id: str,
                       inputs: dict[str, dict] | None = None) -> str:
    """The ablation tables and plots over this sweep's experiments, logged to the sweep's parent run.

    ``inputs`` ({experiment: {"deps", "params"}}, from DVC) let the report find the earlier evaluate run
    whose outputs DVC restored from its run cache for a trial that logged none itself.
    """
    from knn_diffusion.evaluation.report import publish_report

    out = repo / "outputs" / "report" / prefix
    try:
        publish_report(experiment, out, pipeline_runs=names, tracking_uri=uri, run_id=run_id, restored=inputs)
    except ValueError as err:  # no evaluate runs, or mixed FID features: the experiments themselves succeeded
        get_run_logger().warning("no ablation report: %s", err)
        return ""
    get_run_logger().info("ablation report: %s", out / "tables.md")
    return str(out / "tables.md")
