"""Run DVC stages on Prefect work pools: the team-scale path (workers share no disk, only a DVC remote).

A workspace is (git revision, params.yaml, dvc.lock). For each stage the pipeline starts the deployment
of :func:`remote_stage` on the stage's pool (``meta.pool`` in dvc.yaml; ``cpu`` when unset). The worker
clones the revision, writes the two files, pulls what the stage needs from the DVC remote, reproduces
it (``dvc repro`` skips it when it is up to date), pushes its outputs and publishes the dvc.lock that
DVC wrote, with the stage's metrics files (git's, not the remote's), as an artifact of its flow run; the
pipeline adopts them before the next stage. Stages
run one after another, so no lock update is lost; the parallel work happens inside a stage (GPU, DDP)
and across sweep trials.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.dag import stage_graph
from flows.dvc_cli import run_stage, stage_env
from knn_diffusion.stages.common import dvc_stages
from knn_diffusion.tracking import PIPELINE_RUN_ENV

STAGE_FLOW = "knn-diffusion-stage"
DEFAULT_POOL = "cpu"
LOCK_ARTIFACT = "dvc-lock"
# A stage run whose worker died with it (Crashed by the stack's zombie automation, knn_diffusion.stack.zombies)
# runs again this many times: the same flow run, back in its pool's queue for a live worker. (A flow's own
# `retries` cannot do it: the server keeps such retries for the process that failed, and no worker takes them.)
CRASH_RETRIES = 1


def stage_pools(dvc_yaml: str | Path) -> dict[str, str]:
    """{stage: work pool} from each stage's ``meta.pool`` in dvc.yaml (one place for routing)."""
    return {name: str((spec.get("meta") or {}).get("pool", DEFAULT_POOL))
            for name, spec in dvc_stages(dvc_yaml).items()}


def _run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=stage_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}) in {cwd}:\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def git_tracked_outputs(dvc_yaml: Path, stage: str) -> list[str]:
    """The stage's ``cache: false`` outputs (its metrics files): git keeps them, not the DVC remote."""
    spec = dvc_stages(dvc_yaml)[stage]
    return [path for kind in ("outs", "metrics", "plots") for entry in spec.get(kind) or [] if isinstance(entry, dict)
            for path, options in entry.items() if (options or {}).get("cache") is False]


def _files_markdown(files: dict[str, str]) -> str:
    return f"```json\n{json.dumps(files, indent=1, sort_keys=True)}\n```\n"


def files_from_markdown(markdown: str) -> dict[str, str]:
    """{path: text} inside a stage's hand-back artifact (see :func:`_files_markdown`)."""
    body = markdown.strip()
    if not (body.startswith("```json\n") and body.endswith("```")):
        raise ValueError("a dvc-lock artifact must hold one ```json block")
    return json.loads(body[len("```json\n"):-3])


@flow(name=STAGE_FLOW, log_prints=True)
def remote_stage(stage: str, repo_url: str, rev: str, params_yaml: str, dvc_lock: str = "",
                 force: bool = False, run_env: dict[str, str] | None = None) -> str:
    """Reproduce ``stage`` of ``repo_url`` at ``rev`` with the given params and lock; returns the new lock."""
    logger = get_run_logger()
    dvc = str(Path(sys.executable).parent / "dvc")
    # (a DVC daemon may still be writing .dvc/tmp as the checkout is removed)
    with tempfile.TemporaryDirectory(prefix=f"knn-diffusion-{stage}-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp) / "repo"
        _run(["git", "clone", "--quiet", repo_url, str(work)], Path(tmp))
        _run(["git", "checkout", "--quiet", rev], work)
        (work / "params.yaml").write_text(params_yaml)
        if dvc_lock:
            (work / "dvc.lock").write_text(dvc_lock)
        # Inputs from the stages upstream, and the stage's own outputs when they exist: with both,
        # an up-to-date stage is skipped instead of recomputed.
        needed = sorted(stage_graph(work / "dvc.yaml")[stage]) + [stage]
        logger.info("pulling %s from the DVC remote", needed)
        _run([dvc, "pull", "--allow-missing", *needed], work)
        run_stage.fn(stage, str(work), run_env or {}, force)
        _run([dvc, "push", stage], work)
        handed_back = {path: (work / path).read_text() for path in
                       ["dvc.lock", *git_tracked_outputs(work / "dvc.yaml", stage)] if (work / path).is_file()}
    create_markdown_artifact(_files_markdown(handed_back), key=LOCK_ARTIFACT,
                             description=f"dvc.lock and metrics after stage '{stage}' at {rev[:12]}")
    return handed_back["dvc.lock"]


def read_handed_back(flow_run_id) -> dict[str, str]:
    """The dvc.lock and metrics files a finished :func:`remote_stage` run published, by path."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[LOCK_ARTIFACT])))
    if not found:
        raise RuntimeError(f"flow run {flow_run_id} published no {LOCK_ARTIFACT} artifact")
    return files_from_markdown(str(found[0].data))


def _logger():
    try:
        return get_run_logger()
    except Exception:  # called outside a flow run
        return logging.getLogger(__name__)


def rerun(flow_run_id, poll_interval: float = 2):
    """Put a deployment's finished flow run back in its work queue (what the UI's Retry does) and wait until it
    ends again; returns the flow run."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, AwaitingRetry(message="its worker died: run again"))
        while not (run := client.read_flow_run(flow_run_id)).state.is_final():
            time.sleep(poll_interval)
    return run


def run_on_pools(order: list[str], repo: Path, run_env: dict[str, str], force: bool = False, repo_url: str = "",
                 publish_branch: str = "") -> None:
    """Run ``order`` stage by stage, each as a flow run of its pool's :func:`remote_stage` deployment.

    Workers clone ``repo_url`` (default: ``repo`` itself, for workers on this machine) at this checkout's
    HEAD, so code changes must be committed (and pushed) first. With ``publish_branch`` the final
    params.yaml + dvc.lock are committed to that branch and pushed to ``repo_url``: any machine then gets
    the run's data with ``git checkout <branch> && dvc pull``.
    """
    from prefect.deployments import run_deployment

    from knn_diffusion.io import write_text

    rev = _run(["git", "rev-parse", "HEAD"], repo).strip()
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no", "--", "dvc.yaml", "src", "flows"], repo)
    if dirty.strip():
        raise RuntimeError(f"{repo}: uncommitted changes to the pipeline code ({dirty.split()[1:3]}...); workers "
                           f"run the committed revision {rev[:12]}: commit and push first")
    url = repo_url or str(repo)
    pools = stage_pools(repo / "dvc.yaml")
    lock_path = repo / "dvc.lock"
    published = {"params.yaml", "dvc.lock"}
    for stage in order:
        run = run_deployment(f"{STAGE_FLOW}/{pools[stage]}", timeout=None, poll_interval=2, parameters={
            "stage": stage, "repo_url": url, "rev": rev, "params_yaml": (repo / "params.yaml").read_text(),
            "dvc_lock": lock_path.read_text() if lock_path.is_file() else "", "force": force,
            "run_env": run_env})
        for _ in range(CRASH_RETRIES):
            if not run.state.is_crashed():
                break
            _logger().warning("stage '%s': flow run '%s' crashed (%s); running it again", stage, run.name,
                              run.state.message)
            run = rerun(run.id)
        if not run.state.is_completed():
            raise RuntimeError(f"stage '{stage}' on pool '{pools[stage]}': flow run '{run.name}' ended "
                               f"{run.state.name}: {run.state.message}")
        for path, text in read_handed_back(run.id).items():
            write_text(repo / path, text)
            published.add(path)
    if publish_branch:
        git = ["git", "-c", "user.name=knn-diffusion", "-c", "user.email=pipeline@knn-diffusion"]
        _run(git + ["checkout", "-q", "-B", publish_branch], repo)
        _run(git + ["add", *sorted(published)], repo)
        message = f"pipeline run {run_env.get(PIPELINE_RUN_ENV, '')}: {', '.join(order)}"
        _run(git + ["commit", "-q", "--allow-empty", "-m", message], repo)
        _run(git + ["push", "-q", "--force", url, f"HEAD:refs/heads/{publish_branch}"], repo)
