"""What every stage shares: argument parsing, params loading, error reporting, its MLflow run."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Callable, Iterator

from knn_diffusion.config import ConfigError, Params, load_params, to_plain
from knn_diffusion.tracking import StageRun, repo_root, stage_run


def run_stage(name: str, body: Callable[[Params], None], argv: list[str] | None = None,
              user_errors: tuple[type[Exception], ...] = ()) -> None:
    """Parse ``[--params FILE] [key=value ...]``, validate, run ``body``; exit 2 on bad config or on one
    of the stage's ``user_errors`` (bad input files: a one-line ``error:`` instead of a traceback)."""
    parser = argparse.ArgumentParser(prog=f"python -m knn_diffusion.stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("overrides", nargs="*", help="ad-hoc overrides as key=value (validated)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's API client logs every request
    try:
        params = load_params(args.params, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        body(params)
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def dvc_input_hashes(root: Path, stage: str) -> dict[str, str]:
    """md5 of each dep of ``stage`` as DVC recorded it when its producer last ran (from dvc.lock)."""
    import yaml

    dvc_yaml, lock = root / "dvc.yaml", root / "dvc.lock"
    if not dvc_yaml.is_file() or not lock.is_file():
        return {}
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    locked = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    known: dict[str, str] = {}
    for entry in locked.values():
        for item in entry.get("outs", []) + entry.get("deps", []):
            if "md5" in item:
                known[item["path"]] = item["md5"]
    deps = stages.get(stage, {}).get("deps", [])
    return {f"dvc.dep.{dep}": known[dep] for dep in deps if dep in known}


def _section(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


@contextlib.contextmanager
def tracked(stage: str, params: Params, *sections: str) -> Iterator[StageRun]:
    """The stage's MLflow run, logging the params sections it depends on (as in dvc.yaml) and tagged
    with the DVC hashes of its inputs."""
    plain = to_plain(params)
    with stage_run(stage, {name: _section(plain, name) for name in sections}, params.tracking.experiment,
                   params.tracking.tracking_uri, tags=dvc_input_hashes(repo_root(), stage)) as run:
        yield run
