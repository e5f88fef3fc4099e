"""Rollback across machines: versions go through the DVC remote, another clone restores any of them."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from flows.pipeline import stage_env
from tests.conftest import REPO
from tests.test_stages_end_to_end import TINY

DVC = str(Path(sys.executable).parent / "dvc")
INDEX_FILE = Path("data/index/openmoji/index.faiss")


def run(repo: Path, *cmd: str) -> str:
    done = subprocess.run(list(cmd), cwd=repo, env=stage_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def git(repo: Path, *args: str) -> str:
    return run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", *args)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_other_clone_pulls_v1_back_without_retraining(tmp_path):
    first, store = tmp_path / "first", tmp_path / "remote"
    first.mkdir()
    shutil.copytree(REPO / "src", first / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", first / "dvc.yaml")
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    params["data"]["datasets"] = {"openmoji": {"source": "openmoji", "limit": 80}}
    (first / "params.yaml").write_text(yaml.safe_dump(params))
    run(first, "git", "init", "-q")
    run(first, DVC, "init", "-q")
    run(first, DVC, "remote", "add", "-d", "team", str(store))
    git(first, "add", "-A")
    git(first, "commit", "-qm", "pipeline")

    run(first, DVC, "repro", "train_continuous")
    git(first, "add", "dvc.lock", "params.yaml")
    git(first, "commit", "-qm", "v1")
    git(first, "tag", "v1")
    run(first, DVC, "push")
    v1_index = sha256(first / INDEX_FILE)

    params["index"]["factory"] = "IVF2,Flat"
    (first / "params.yaml").write_text(yaml.safe_dump(params))
    run(first, DVC, "repro", "train_continuous")
    git(first, "add", "dvc.lock", "params.yaml")
    git(first, "commit", "-qm", "v2: another index")
    run(first, DVC, "push")
    assert sha256(first / INDEX_FILE) != v1_index

    # "Another machine": a fresh clone at v2 goes back to v1 as the README says, through the remote only.
    second = tmp_path / "second"
    run(tmp_path, "git", "clone", "-q", str(first), str(second))
    git(second, "checkout", "v1", "--", "dvc.lock", "params.yaml")
    run(second, DVC, "pull", "--with-deps", "train_continuous")  # the stages this test ran; a demo: `dvc pull`
    assert sha256(second / INDEX_FILE) == v1_index
    status = json.loads(run(second, DVC, "status", "--json"))
    assert status == {}, f"after the rollback DVC would rerun: {status}"
