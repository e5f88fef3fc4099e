"""Rollback across machines: versions go through the DVC remote, another clone restores any of them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests import dvc_repo

# Pushes two pipeline versions and pulls one into a second clone (~30 s): the slow tier.
pytestmark = pytest.mark.slow

INDEX_FILE = Path("data/index/openmoji/index.faiss")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_other_clone_pulls_v1_back_without_retraining(dvc_pipeline, tmp_path):
    first = dvc_repo.copy_repo(dvc_pipeline, tmp_path / "first")  # the whole pipeline reproduced: v1
    dvc_repo.dvc(first, "remote", "add", "-d", "team", str(tmp_path / "remote"))
    dvc_repo.commit(first, "v1")
    dvc_repo.run(first, "git", "tag", "v1")
    dvc_repo.dvc(first, "push")
    v1_index = sha256(first / INDEX_FILE)

    dvc_repo.set_param(first, "index.factory", "IVF2,Flat")
    dvc_repo.dvc(first, "repro", "train_continuous")
    dvc_repo.commit(first, "v2: another index")
    dvc_repo.dvc(first, "push")
    assert sha256(first / INDEX_FILE) != v1_index

    # "Another machine": a fresh clone at v2 goes back to v1 as the README says, through the remote only.
    second = tmp_path / "second"
    dvc_repo.run(tmp_path, "git", "clone", "-q", str(first), str(second))
    dvc_repo.run(second, "git", "checkout", "v1", "--", "dvc.lock", "params.yaml", "metrics")
    dvc_repo.dvc(second, "pull")
    assert sha256(second / INDEX_FILE) == v1_index
    assert dvc_repo.status(second) == {}, "after the rollback nothing may rerun (no retraining)"
