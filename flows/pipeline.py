"""Prefect 3 flow that runs the DVC pipeline: one task per dvc.yaml stage, in DAG order.

Each task calls ``dvc repro --single-item <stage>``, so DVC alone decides what is up to date; the
flow adds scheduling, retries on transient failures (the repo lock, a flaky filesystem), a run
record in Prefect, and a ``pipeline_run`` tag on every stage's MLflow run.

    python -m flows.pipeline                      # ephemeral Prefect, no server needed
    PREFECT_API_URL=http://host:4200/api python -m flows.pipeline   # against a server
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed

from flows.dag import (
    stage_backbones,
    stage_graph,
    stage_order,
    stages_on_all_cores,
    with_upstream,
    without_backbones,
)
from flows.dvc_cli import run_stage
from knn_diffusion.config import load_params
from knn_diffusion.tracking import (
    FLOW_RUN_URL_ENV,
    PARENT_RUN_ENV,
    PIPELINE_RUN_ENV,
    git_commit,
    group_run,
    tracking_uri,
)


def run_side_by_side(order: list[str], graph: dict[str, set[str]], slots: int,
                     submit: Callable[[str, int], PrefectFuture], all_cores: set[str] = frozenset()) -> None:
    """Run the stages of ``order`` (a topological order), up to ``slots`` at once, each as soon as its upstream
    has finished: of the ready ones, the earliest in ``order`` first (``stage_order``: the longest chain first).
    Each stage process gets cores / slots threads (two stages with every core each ran 2.4x slower than with one
    each), except a stage of ``all_cores``: it waits for the running ones, then runs alone with every core.
    A failed stage's downstream never starts; the others run to the end, then the first failure is raised
    (the flow run ends Failed)."""
    pending, running, finished, dead, failures = list(order), {}, set(), set(), []
    needs = {name: graph[name] & set(order) for name in order}
    while pending or running:
        for name in [n for n in pending if needs[n] & dead]:  # in order: downstream of a failure, transitively
            dead.add(name)
            pending.remove(name)
            get_run_logger().error("%s not started: an upstream stage failed", name)
        for name in [n for n in pending if needs[n] <= finished]:  # the ready ones, in order
            if len(running) >= slots or running.keys() & all_cores:
                break
            if name in all_cores:
                if not running:
                    running[name] = submit(name, 1)
                    pending.remove(name)
                break  # nothing starts before or beside it
            running[name] = submit(name, slots)
            pending.remove(name)
        if not running:
            break
        done = next(as_completed(list(running.values())))
        name = next(n for n, future in running.items() if future is done)
        del running[name]
        try:
            done.result()
            finished.add(name)
        except Exception as err:  # noqa: BLE001 - raised once every other stage has ended
            dead.add(name)
            failures.append(err)
    if failures:
        raise failures[0]


@flow(name="knn-diffusion-pipeline", log_prints=True)
def pipeline(repo: str = ".", stages: list[str] | None = None, force: bool = False, pools: bool = False,
             repo_url: str = "", publish_branch: str = "", parallel_stages: int = 1) -> list[str]:
    """Run the dvc.yaml stages (all, or the named ones and what they need) in dependency order.

    ``pools``: run each stage on its work pool (``meta.pool`` in dvc.yaml) through the deployments in
    prefect.yaml, data passing through the DVC remote (:mod:`flows.remote`); otherwise run them here.
    """
    from prefect.runtime import flow_run

    repo_path = Path(repo).resolve()
    graph = stage_graph(repo_path / "dvc.yaml")
    running = list(graph)  # dvc.yaml's order
    if stages:
        running = with_upstream(stages, graph, running)
    run_id, url = str(flow_run.get_id() or ""), flow_run.ui_url or ""
    params = load_params(repo_path / "params.yaml")
    if not stages:  # the whole DAG: only the backbones params.yaml asks for (pipeline.backbones)
        keep = {b.value for b in params.pipeline.backbones}
        skipped = without_backbones(graph, stage_backbones(repo_path / "dvc.yaml"), keep)
        if skipped:
            get_run_logger().info("skipping %s (pipeline.backbones = %s)", sorted(skipped), sorted(keep))
        running = [s for s in running if s not in skipped]
    order = stage_order(graph, running)
    # One MLflow parent run per pipeline run; every stage's run is its child.
    with group_run(f"pipeline {flow_run.name or ''}".strip(), params.tracking.experiment,
                   tracking_uri(params.tracking.tracking_uri, root=repo_path), params=params,
                   tags={"kind": "pipeline", "git.commit": git_commit(repo_path)[0], "prefect.flow_run_url": url,
                         "pipeline_run": run_id, "stages": ",".join(order)}) as parent:
        run_env = {PIPELINE_RUN_ENV: run_id, PARENT_RUN_ENV: parent.id, FLOW_RUN_URL_ENV: url}
        if pools:
            from flows.remote import run_on_pools

            run_on_pools(order, repo_path, run_env, force, repo_url, publish_branch)
            return order
        run_side_by_side(order, graph, max(parallel_stages, 1),
                         lambda name, slots: run_stage.submit(name, str(repo_path), run_env, force, slots),
                         all_cores=stages_on_all_cores(repo_path / "dvc.yaml"))
    return order


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("stages", nargs="*", help="stages to run with their upstream (default: all)")
    parser.add_argument("--repo", default=".", help="repository root holding dvc.yaml")
    parser.add_argument("--force", action="store_true", help="rerun stages even if DVC finds them up to date")
    parser.add_argument("--pools", action="store_true",
                        help="run each stage on its Prefect work pool (dvc.yaml meta.pool) via the DVC remote")
    parser.add_argument("--repo-url", default="", help="with --pools: the git URL workers clone (default: --repo)")
    parser.add_argument("--publish-branch", default="", help="with --pools: push the final dvc.lock to this branch")
    parser.add_argument("--parallel-stages", type=int, default=1,
                        help="stages run at once on this machine, each as soon as its upstream is done, with "
                        "cores / N threads (default 1: in turn, each with every core; make demo uses 2)")
    args = parser.parse_args(argv)
    pipeline(repo=args.repo, stages=args.stages or None, force=args.force, pools=args.pools,
             repo_url=args.repo_url, publish_branch=args.publish_branch, parallel_stages=args.parallel_stages)


if __name__ == "__main__":
    main()
