"""A sweep through a Prefect deployment on a local worker, against the team stack without Docker.

Starts on loopback: Postgres (Debian `postgresql`, two databases), an S3 endpoint (moto), an MLflow
tracking server on Postgres with its artifacts in S3, a Prefect server on Postgres, the `cpu` and `gpu`
process work pools and a worker on `cpu`. Deploys prefect.yaml from a clone of this repository's HEAD
(workers clone it, as they would the team's git server), runs the `sweep` deployment, and prints the
wall time, the MLflow parent/child tree, how often each shared stage ran, and a screenshot of the MLflow
UI's runs table with the sweep expanded. Everything is stopped at the end.

    .venv/bin/python -m benchmarks.team_sweep --work /tmp/team-sweep \
        train_continuous.k=1,10 + train_continuous.variant=no_knn
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from knn_diffusion.stack.processes import background
from knn_diffusion.stack.services import (
    create_database,
    database_url,
    mlflow_server,
    postgres,
    prefect_server,
    s3_keys,
    s3_server,
)
from tests.browser import chromium_page, row_cells, show_columns

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED_STAGES = ("ingest", "encoder", "embed", "index", "knn", "tokenizer", "train_discrete")


def sh(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def prefect_db(mlflow_db: str) -> str:
    """A second database on the same Postgres; returns its asyncpg URL (what the Prefect server speaks)."""
    port = int(re.search(r":(\d+)/", mlflow_db).group(1))
    create_database("127.0.0.1", port, "prefect")
    return database_url("127.0.0.1", port, "prefect", driver="asyncpg")


def mlflow_tree(uri: str, experiment: str, prefix: str) -> tuple[list[str], Counter]:
    """Lines of the sweep's parent -> trial -> stage tree, and how many runs each stage has under it."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", max_results=5000)
    children: dict[str, list] = {}
    for run in runs:
        children.setdefault(run.data.tags.get("mlflow.parentRunId", ""), []).append(run)
    (parent,) = [r for r in runs if r.info.run_name == f"sweep {prefix}"]

    def line(run, depth: int) -> str:
        seconds = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        return f"{'  ' * depth}{run.info.run_name}  [{run.info.status}, {seconds:.0f} s]"

    lines, stages = [line(parent, 0)], Counter()
    for trial in sorted(children.get(parent.info.run_id, []), key=lambda r: r.info.start_time):
        shown = ("train_continuous.k", "train_continuous.variant")
        lines.append(line(trial, 1) + "  " + ", ".join(
            f"{k}={v}" for k, v in sorted(trial.data.params.items()) if k in shown))
        for stage in sorted(children.get(trial.info.run_id, []), key=lambda r: r.info.start_time):
            lines.append(line(stage, 2))
            stages[stage.data.tags.get("stage", stage.info.run_name)] += 1
    return lines, stages


def screenshot(uri: str, experiment: str, prefix: str, trials: list[str], out: Path) -> dict[str, list[str]]:
    import mlflow

    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    with chromium_page() as page:
        page.goto(f"{uri}/#/experiments/{experiment_id}/runs")  # the training runs table, not the GenAI view
        row = page.get_by_role("row").filter(has_text=f"sweep {prefix}")
        row.first.wait_for(timeout=120_000)
        row.first.locator("button").first.click()  # expand the parent: its trials are nested under it
        page.get_by_role("row").filter(has_text=trials[-1]).first.wait_for(timeout=60_000)
        show_columns(page, ["train_continuous.k", "train_continuous.variant"])
        page.screenshot(path=out)
        return {name: row_cells(page, name) for name in trials}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("axes", nargs="+")
    parser.add_argument("--work", type=Path, default=Path("/tmp/team-sweep"))
    parser.add_argument("--prefix", default="team")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    origin = work / "origin"  # the team's git server: HEAD of this checkout
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", "-b", "main", str(REPO), str(origin)], check=True)
    experiment = "knn-diffusion"

    with postgres("mlflow") as mlflow_db, s3_server(work, "team") as s3, \
            mlflow_server(work, mlflow_db, "s3://team/mlflow", s3_endpoint=s3) as tracking, \
            prefect_server(work / "prefect-home", work / "prefect-server.log", prefect_db(mlflow_db)) as env:
        env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2", "KNN_DIFFUSION_GIT_URL": str(origin),
               "MLFLOW_TRACKING_URI": tracking,
               # the flow process imports the cloned revision, not this (possibly edited) checkout
               "PYTHONPATH": str(origin / "src"), "TQDM_MININTERVAL": "30"}
        prefect = str(BIN / "prefect")
        for pool in ("cpu", "gpu"):
            sh([prefect, "work-pool", "create", pool, "--type", "process"], origin, env)
        sh([prefect, "--no-prompt", "deploy", "--all"], origin, env)
        worker_dir = work / "worker"
        worker_dir.mkdir()
        with background([prefect, "worker", "start", "--pool", "cpu", "--type", "process"], work / "worker.log",
                        env=env):
            parameters = json.dumps({"axes": args.axes, "prefix": args.prefix})
            start = time.time()
            out = subprocess.run([prefect, "deployment", "run", "knn-diffusion-sweep/sweep", "--params", parameters,
                                  "--watch", "--watch-timeout", "7200"], cwd=worker_dir, env=env,
                                 capture_output=True, text=True)
            wall = time.time() - start
        print(out.stdout[-1500:], out.stderr[-1500:], sep="\n")
        print(f"deployment run: exit {out.returncode}, wall {wall / 60:.1f} min")
        lines, stages = mlflow_tree(tracking, experiment, args.prefix)
        print("\nMLflow tree (run  [status, duration]):", *lines, sep="\n")
        print("\nstage runs under the sweep:", dict(stages))
        print("shared stages ran:", {s: stages.get(s, 0) for s in SHARED_STAGES})
        trials = [row.split()[0] for row in lines if row.startswith("  ") and not row.startswith("    ")]
        cells = screenshot(tracking, experiment, args.prefix, trials, work / "mlflow-sweep.png")
        print("\nUI rows (screenshot:", work / "mlflow-sweep.png", "):")
        for name, row in cells.items():
            print(" ", name, "|", " ".join(row))
        keys = s3_keys(s3, "team")
        print(f"\nS3 bucket 'team': {len(keys)} artifact objects, e.g.", *keys[:5], sep="\n  ")


if __name__ == "__main__":
    main()
