"""The DVC graph is honest, checked with real ``dvc repro`` on the tiny pipeline in a scratch git+DVC repo.

One repo for the module (a copy of the session's ``dvc_pipeline``: every stage of dvc.yaml ran once, each
under a tracer; then each test changes one thing): every file and module a stage reads is declared in
dvc.yaml; inference-time settings rerun
only ``sample@<model>`` (a backbone's own sampler settings only its item); an index rollback restores
the index bytes and never retrains; MLflow input tags name the hashes the run actually read; a
re-ingest under a fixed encoder re-embeds.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import json
import typing
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from knn_diffusion.config import Params
from knn_diffusion.stages.common import dvc_stages
from tests.conftest import DVC_EXPERIMENT as EXPERIMENT
from tests.dvc_repo import REPO, TRACED, TRACES, commit, copy_repo, dvc, lock, locked_md5, run, set_param, status

INDEX_FILE = "data/index/openmoji/index.faiss"


@pytest.fixture(scope="module")
def repo(dvc_pipeline, tmp_path_factory):
    """The session's reproduced pipeline (v1), copied: the tests below change params and reproduce."""
    return copy_repo(dvc_pipeline, tmp_path_factory.mktemp("dvc-repro") / "repo")


# Read without being a stage input: DVC's and git's own files, the params file (each key a stage reads is
# checked by the params guard in stages/common.py), MLflow's local store, and the resumable training state
# in checkpoints/ (keyed on the inputs, outside DVC by design).
NOT_INPUTS = (".dvc/", ".git/", ".gitignore", "dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", "mlflow.db",
              "mlruns/", "mlartifacts/", "checkpoints/", f"{TRACES}/")


def _entries(items) -> list[str]:
    return [item if isinstance(item, str) else next(iter(item)) for item in items or []]


def _schema_modules(sections: list[str]) -> set[str]:
    """Source files of the params dataclasses/enums of these top-level sections (and everything nested)."""
    found: set[str] = set()
    seen: set[type] = set()

    def walk(tp) -> None:
        for arg in typing.get_args(tp):
            walk(arg)
        if inspect.isclass(tp) and tp not in seen and (dataclasses.is_dataclass(tp) or issubclass(tp, enum.Enum)):
            seen.add(tp)
            found.add(inspect.getsourcefile(tp))
            if dataclasses.is_dataclass(tp):
                for hint in typing.get_type_hints(tp).values():
                    walk(hint)

    hints = typing.get_type_hints(Params)
    for section in sections:
        walk(hints[section])
    return found


def _relative(repo: Path, path: str) -> str | None:
    """``path`` relative to the repo copy, or to the project for its own sources; None outside both."""
    for root, prefix in ((repo, ""), (REPO / "src", "src/")):
        if path.startswith(f"{root}/"):
            return prefix + path[len(f"{root}/"):]
    return None


def _is_package_marker(path: str) -> bool:
    """An ``__init__.py`` holding only a docstring and constants (``__version__``): nothing a stage runs."""
    body = ast.parse(Path(path).read_text()).body
    return all(isinstance(node, (ast.Expr, ast.Assign)) and isinstance(node.value, ast.Constant) for node in body)


def _undeclared_reads(repo: Path, stage: str, trace: dict) -> list[str]:
    """Files under the repo and modules under src/ that ``stage`` read but dvc.yaml does not declare.

    Paths that do not exist after the run (temporary files of atomic writes, libraries probing
    relative paths) cannot be inputs and are skipped.
    """
    spec = dvc_stages(REPO / "dvc.yaml")[stage]
    declared = [d.rstrip("/") for d in _entries(spec.get("deps")) + _entries(spec.get("outs"))
                + _entries(spec.get("metrics"))]
    top = {p.split(".")[0] for p in spec.get("params", [])}
    # Schema modules of sections this stage does not declare: config.py imports them all, but the params
    # guard proves the stage reads none of their keys, so they cannot change its outputs.
    others = [f.name for f in dataclasses.fields(Params) if f.name not in top]
    exempt = {str(Path(p).resolve().relative_to(REPO))
              for p in _schema_modules(others) - _schema_modules(sorted(top))}

    def covered(rel: str) -> bool:
        return any(rel == d or rel.startswith(d + "/") for d in declared)

    missing = []
    for path in trace["files"] + trace["modules"]:
        rel = _relative(repo, path)
        if rel is None or not Path(path).is_file() or "__pycache__" in rel or rel.startswith(NOT_INPUTS):
            continue
        if rel in exempt or (rel.endswith("__init__.py") and _is_package_marker(path)) or covered(rel):
            continue
        missing.append(rel)
    for path in trace["dirs"]:  # a listing: of a declared folder, inside one, or on the way to one
        rel = _relative(repo, path)
        if rel is None or not Path(path).is_dir() or rel.startswith(("src", *NOT_INPUTS)):
            continue  # the import system lists source folders; modules are checked above
        if not (covered(rel) or any(d.startswith(rel + "/") for d in declared)):
            missing.append(rel + "/")
    return sorted(set(missing))


@pytest.mark.parametrize("stage", TRACED)
def test_every_file_and_module_a_stage_reads_is_declared(repo, stage):
    trace_file = repo / TRACES / f"{stage}.json"
    assert trace_file.is_file(), f"{stage} did not run under the tracer"
    trace = json.loads(trace_file.read_text())
    assert any(f.endswith(f"stages/{stage.split('@')[0]}.py") for f in trace["modules"])
    assert _undeclared_reads(repo, stage, trace) == []


def _runs(stage: str) -> list:
    return mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=f"tags.stage = '{stage}'",
                              output_format="list", order_by=["attributes.start_time DESC"])


def test_inference_settings_are_not_inputs_of_the_index_or_training():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in ("index", "knn", "train_continuous"):
        assert not any(p == "retrieval" or p.startswith("retrieval.") for p in spec[stage].get("params", [])), stage
    assert "retrieval" in spec["sample"]["params"]


def test_index_fraction_reruns_only_sample_and_evaluate(repo):
    assert status(repo) == {}
    set_param(repo, "retrieval.index_fraction", 0.3)
    set_param(repo, "retrieval.global_score_filter", {"low": 0.5, "high": 1.0})
    try:
        assert set(status(repo)) == {"sample@continuous", "sample@discrete", "evaluate@continuous", "evaluate@discrete",
                                    "evaluate_manipulation"}  # its edits retrieve neighbours too
    finally:
        run(repo, "git", "checkout", "--", "params.yaml")


def test_a_backbones_sampler_settings_rerun_only_its_own_stages(repo):
    """sample.discrete / evaluate.discrete are inputs of the discrete items only (dvc.yaml: <stage>.${item.model})."""
    assert status(repo) == {}
    set_param(repo, "sample.discrete.steps", 3)
    set_param(repo, "sample.discrete.truncation", 1.0)
    set_param(repo, "evaluate.discrete.steps", 100)
    try:
        assert set(status(repo)) == {"sample@discrete", "evaluate@discrete"}
    finally:
        run(repo, "git", "checkout", "--", "params.yaml")


def test_index_rollback_restores_bytes_and_never_retrains(repo):
    v1_index = (repo / INDEX_FILE).read_bytes()
    v1 = lock(repo)
    trainings = len(_runs("train_continuous"))
    set_param(repo, "index.target_recall", 0.9)
    dvc(repo, "repro", "train_continuous")  # the stages downstream of data/index are not this test's concern
    v2 = lock(repo)
    assert v2["index"]["outs"] != v1["index"]["outs"]  # a new index version (its sidecar records the target)
    assert v2["knn"]["outs"] == v1["knn"]["outs"]  # same neighbours: exact search either way
    assert v2["train_continuous"] == v1["train_continuous"] and len(_runs("train_continuous")) == trainings
    # MLflow input tags are the hashes this run read (the new index), not the previous lock's.
    knn_tags = _runs("knn")[0].data.tags
    assert knn_tags["dvc.dep.data/index"] == locked_md5(repo, "knn", "data/index", "deps")
    assert knn_tags["dvc.dep.data/index"] != next(d["md5"] for d in v1["knn"]["deps"] if d["path"] == "data/index")
    commit(repo, "v2")

    run(repo, "git", "checkout", "HEAD~1", "--", "params.yaml", "dvc.lock", "metrics")
    dvc(repo, "checkout")
    assert (repo / INDEX_FILE).read_bytes() == v1_index
    assert status(repo, "train_continuous") == {}
    assert status(repo) == {}
    commit(repo, "v3: v1 again")  # complete and up to date, for the tests after this one


def test_background_change_re_embeds_under_a_fixed_encoder(repo):
    """encoder.kind=open_clip: same fingerprint and row ids after a re-ingest, yet new vectors."""
    from knn_diffusion.encoders.store import EmbeddingStore

    before = EmbeddingStore.open(repo / "data/embed/openmoji")
    old_vectors, old_fingerprint = before.vectors(), before.fingerprint
    set_param(repo, "data.background", [0, 0, 0])
    dvc(repo, "repro", "--single-item", "ingest")
    dvc(repo, "repro", "--single-item", "embed")  # the encoder stays as it is
    after = EmbeddingStore.open(repo / "data/embed/openmoji")
    assert after.fingerprint == old_fingerprint and np.array_equal(after.ids, before.ids)
    assert not np.allclose(after.vectors(), old_vectors, atol=1e-3)


@pytest.mark.parametrize("stage", TRACED)
def test_metrics_hold_only_numbers(repo, stage):
    """``dvc metrics diff`` material: no fingerprints, names or paths (those live in sidecars in the outs)."""
    from knn_diffusion.config import flatten

    (metrics_file,) = (next(iter(entry)) for entry in dvc_stages(REPO / "dvc.yaml")[stage]["metrics"])
    values = {k: v for k, v in flatten(json.loads((repo / metrics_file).read_text())).items()
              if v != {}}  # an empty group, e.g. no images skipped
    assert values or stage.startswith("human_eval_aggregate"), "empty"  # nothing to count before any answers
    assert all(isinstance(v, (int, float)) for v in values.values()), values
