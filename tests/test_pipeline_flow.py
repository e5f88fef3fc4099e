"""The Prefect flow runs real DVC stages in a temporary copy of the repo."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from flows.dag import named_stages, stage_backbones, stage_graph, stage_order, stages_after, without_backbones
from flows.pipeline import pipeline
from knn_diffusion.stages.common import dvc_stages
from tests.conftest import REPO

DVC = str(Path(sys.executable).parent / "dvc")


@pytest.fixture
def harness(prefect_harness):
    """The session's Prefect test harness (the sweep test modules import this fixture too)."""


@pytest.fixture
def repo_copy(tmp_path):
    """A git+DVC repo with this project's dvc.yaml and stage code, and tiny dataset limits."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    (repo / "emoji-styles").mkdir()
    shutil.copy(REPO / "emoji-styles" / "package-lock.json", repo / "emoji-styles")  # an ingest dep
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["datasets"] = {"openmoji": {"source": "openmoji", "limit": 12},
                                  "noto": {"source": "noto", "limit": 6, "optional": True}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], [DVC, "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=repo, check=True)
    return repo


def _ingest_runs(run_marker: str | None = None):
    runs = mlflow.search_runs(experiment_names=["knn-diffusion"], filter_string="tags.stage = 'ingest'",
                              output_format="list")
    return [r for r in runs if run_marker is None or r.data.tags.get("pipeline_run") == run_marker]


def test_flow_runs_stage_through_dvc_then_skips_it(harness, repo_copy):
    state = pipeline(repo=str(repo_copy), stages=["ingest"], return_state=True)
    assert state.is_completed()
    store_dir = repo_copy / "data" / "ingest" / "openmoji"
    assert (store_dir / "manifest.parquet").is_file() and (store_dir / "images-00000.npy").is_file()
    status = subprocess.run([DVC, "status", "ingest", "--json"], cwd=repo_copy, capture_output=True, text=True,
                            check=True)
    assert status.stdout.strip() == "{}", status.stdout
    flow_run_id = str(state.state_details.flow_run_id)
    runs = _ingest_runs(flow_run_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # One MLflow parent run per pipeline run, the stage's run its child, both tagged with the flow run.
    parent = mlflow.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.data.tags["kind"] == "pipeline" and parent.data.tags["pipeline_run"] == flow_run_id
    assert parent.info.status == "FINISHED" and parent.data.params["data.resolution"] == "32"
    assert runs[0].data.tags["prefect.flow_run_url"].endswith(f"/flow-run/{flow_run_id}")
    assert runs[0].data.metrics["openmoji.images"] == 12
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "samples")]
    assert "samples/openmoji.png" in artifacts

    again = pipeline(repo=str(repo_copy), stages=["ingest"], return_state=True)
    assert again.is_completed()
    assert _ingest_runs(str(again.state_details.flow_run_id)) == [], "an up-to-date stage must do no work"


def test_failing_stage_fails_the_flow_run(harness, repo_copy):
    spec = yaml.safe_load((repo_copy / "dvc.yaml").read_text())
    spec["stages"]["boom"] = {"cmd": "python -c \"raise SystemExit('model exploded')\"",
                              "deps": ["data/ingest"], "outs": ["data/boom"]}
    (repo_copy / "dvc.yaml").write_text(yaml.safe_dump(spec))
    state = pipeline(repo=str(repo_copy), stages=["boom"], return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="stage 'boom' failed"):
        state.result()


STAMP = ("import json, os, sys, time; start = time.time(); time.sleep(2); {fail}"
         "open(sys.argv[1], 'w').write(json.dumps([start, time.time(), os.environ['OMP_NUM_THREADS']]))")


def _stamping_stages(repo: Path, failing: str = "", all_cores: str = "") -> None:
    """Stages a, b (independent) and c (after a) that write when they ran and their thread count; ``failing``
    exits 1 instead; ``all_cores`` has ``meta: {all_cores: true}``."""
    stages = {}
    for name, deps in (("a", []), ("b", []), ("c", ["out/a.json"])):
        fail = "sys.exit('stage failed on purpose'); " if name == failing else ""
        script = repo / f"{name}.py"
        script.write_text(STAMP.format(fail=fail))
        stages[name] = {"cmd": f"python {script.name} out/{name}.json", "deps": [script.name, *deps],
                        "outs": [f"out/{name}.json"]}
        if name == all_cores:
            stages[name]["meta"] = {"all_cores": True}
    (repo / "out").mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))


def _ran(repo: Path, name: str) -> list[float] | None:
    path = repo / "out" / f"{name}.json"
    return yaml.safe_load(path.read_text()) if path.exists() else None


def test_parallel_stages_start_each_stage_once_its_upstream_is_done(harness, repo_copy):
    _stamping_stages(repo_copy)
    assert pipeline(repo=str(repo_copy), stages=["b", "c"], parallel_stages=2) == ["a", "b", "c"]
    a, b, c = (_ran(repo_copy, n) for n in "abc")
    assert a[0] < b[1] and b[0] < a[1]  # a and b side by side (real DVC processes in one repo)
    assert c[0] >= a[1]  # c after its upstream


def test_an_all_cores_stage_runs_alone_with_every_core(harness, repo_copy, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")                     # the run's thread budget: 2 cores
    _stamping_stages(repo_copy, all_cores="a")
    assert pipeline(repo=str(repo_copy), stages=["b", "c"], parallel_stages=2) == ["a", "b", "c"]
    a, b, c = (_ran(repo_copy, n) for n in "abc")
    assert a[2] == "2" and b[2] == c[2] == "1"
    assert b[0] >= a[1]                                            # b waited: nothing beside a
    assert c[0] < b[1] and b[0] < c[1]                             # then b and c side by side


def test_parallel_stages_run_what_a_failure_does_not_block(harness, repo_copy):
    _stamping_stages(repo_copy, failing="a")
    state = pipeline(repo=str(repo_copy), stages=["b", "c"], parallel_stages=2, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="stage 'a' failed"):
        state.result()
    assert _ran(repo_copy, "b") is not None and _ran(repo_copy, "c") is None


def test_dag_is_derived_from_dvc_yaml(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "train": {"cmd": "x", "deps": ["data/knn/table.npy", "data/ingest"], "outs": ["models/m"]},
        "ingest": {"cmd": "x", "outs": ["data/ingest"], "metrics": [{"metrics/ingest.json": {"cache": False}}]},
        "knn": {"cmd": "x", "deps": ["data/ingest/openmoji"], "outs": ["data/knn"]},
        "report": {"cmd": "x", "deps": ["metrics/ingest.json", "models/m"]},
    }}))
    graph = stage_graph(tmp_path / "dvc.yaml")
    assert graph == {"ingest": set(), "knn": {"ingest"}, "train": {"knn", "ingest"}, "report": {"ingest", "train"}}
    order = stage_order(graph)
    assert order.index("ingest") < order.index("knn") < order.index("train") < order.index("report")


def test_order_starts_the_longest_chain_first(tmp_path):
    """Two slots free when train_continuous ends: train_manipulation (three stages after it) must not wait
    behind sample@continuous (none), as it did in dvc.yaml's order (it started 18 s late in the demo)."""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "lonely": {"cmd": "x", "outs": ["out/lonely"]},
        "a": {"cmd": "x", "outs": ["out/a"]},
        "b": {"cmd": "x", "deps": ["out/a"], "outs": ["out/b"]},
        "c": {"cmd": "x", "deps": ["out/b"], "outs": ["out/c"]},
    }}, sort_keys=False))
    graph = stage_graph(tmp_path / "dvc.yaml")
    assert stages_after(graph) == {"lonely": 0, "a": 2, "b": 1, "c": 0}
    assert stage_order(graph) == ["a", "b", "lonely", "c"]
    assert stage_order(graph, ["c", "lonely", "a"]) == ["lonely", "a", "c"]  # a's chain runs through b: gone
    graph = stage_graph(REPO / "dvc.yaml")
    order = stage_order(graph)
    assert all(order.index(up) < order.index(name) for name, ups in graph.items() for up in ups)
    assert order.index("train_manipulation") < order.index("evaluate@continuous") < order.index("sample@continuous")


def test_backbone_switch_skips_a_backbone_and_what_needs_it(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "knn": {"cmd": "x", "outs": ["data/knn"]},
        "train_a": {"cmd": "x", "deps": ["data/knn"], "outs": ["models/a"], "meta": {"backbone": "continuous"}},
        "tokens": {"cmd": "x", "deps": ["data/knn"], "outs": ["data/tokens"], "meta": {"backbone": "discrete"}},
        "train_b": {"cmd": "x", "deps": ["data/tokens"], "outs": ["models/b"], "meta": {"backbone": "discrete"}},
        "sample_b": {"cmd": "x", "deps": ["models/b"], "outs": ["out/b"]},
    }}))
    graph, backbones = stage_graph(tmp_path / "dvc.yaml"), stage_backbones(tmp_path / "dvc.yaml")
    assert backbones == {"train_a": "continuous", "tokens": "discrete", "train_b": "discrete"}
    assert without_backbones(graph, backbones, {"continuous"}) == {"tokens", "train_b", "sample_b"}
    assert without_backbones(graph, backbones, {"discrete"}) == {"train_a"}
    assert without_backbones(graph, backbones, {"continuous", "discrete"}) == set()
    real = stage_backbones(REPO / "dvc.yaml")
    assert real["train_continuous"] == "continuous" and real["tokenizer"] == real["train_discrete"] == "discrete"


def test_sample_and_evaluate_are_one_stage_per_backbone_with_its_own_upstream():
    """The project's matrix stages, as DVC names them, each fed by its own backbone's training stage."""
    graph = stage_graph(REPO / "dvc.yaml")
    for stage in ("sample", "evaluate"):
        assert stage not in graph
        assert "train_continuous" in graph[f"{stage}@continuous"] and "train_discrete" in graph[f"{stage}@discrete"]
        assert "train_discrete" not in graph[f"{stage}@continuous"]
        assert "train_continuous" not in graph[f"{stage}@discrete"]
    assert graph["human_eval"] == {"evaluate@continuous", "evaluate@discrete"}
    order = stage_order(stage_graph(REPO / "dvc.yaml"))
    assert named_stages(["evaluate", "sample@discrete", "knn", "sample@gan"], order) == {
        "evaluate": ["evaluate@continuous", "evaluate@discrete"], "sample@discrete": ["sample@discrete"],
        "knn": ["knn"], "sample@gan": []}
    backbones = stage_backbones(REPO / "dvc.yaml")
    assert backbones["evaluate@discrete"] == backbones["sample@discrete"] == "discrete"
    # pipeline.backbones: [continuous] skips the discrete items, keeps human_eval (fed by evaluate@continuous)
    assert without_backbones(graph, backbones, {"continuous"}) == {"tokenizer", "train_discrete", "sample@discrete",
                                                                   "evaluate@discrete"}
    # manipulation fine-tunes the continuous model, so its stages go with it
    assert without_backbones(graph, backbones, {"discrete"}) == {
        "train_continuous", "sample@continuous", "evaluate@continuous", "manipulation_pairs", "train_manipulation",
        "evaluate_manipulation", "human_eval_manipulation", "human_eval_aggregate_manipulation"}
    from flows.remote import git_tracked_outputs, stage_pools

    assert stage_pools(REPO / "dvc.yaml")["evaluate@discrete"] == "gpu"
    assert git_tracked_outputs(REPO / "dvc.yaml", "evaluate@discrete") == ["metrics/evaluate-discrete.json"]


def test_repo_dvc_yaml_matches_stage_paths():
    """Every data path in dvc.yaml is a constant of stages/paths.py, and every constant there is in dvc.yaml
    (or inside / above a path there, or resumable state under checkpoints/, outside DVC by design)."""
    from pathlib import PurePath

    from knn_diffusion.stages import paths

    constants = {str(value) for value in vars(paths).values() if isinstance(value, PurePath)}
    constants |= {str(f(model)) for model in ("continuous", "discrete")
                  for f in (paths.model_dir, paths.samples_dir, paths.sample_metrics, paths.evaluate_dir,
                            paths.evaluate_metrics)}
    spec = dvc_stages(REPO / "dvc.yaml")
    in_dvc = set()
    for stage in spec.values():
        for kind in ("deps", "outs", "metrics"):
            in_dvc |= {entry if isinstance(entry, str) else next(iter(entry)) for entry in stage.get(kind) or []}
    data_paths = {p for p in in_dvc if not p.startswith("src/")}
    unknown = {p for p in data_paths if not any(p == c or p.startswith(c + "/") for c in constants)}
    assert unknown == set(), "dvc.yaml paths that are not (inside) a path of stages/paths.py"

    def accounted(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") or p.startswith(path + "/") for p in data_paths)

    unaccounted = {c for c in constants if not accounted(c) and not c.startswith(str(paths.CHECKPOINTS))}
    assert unaccounted == set(), "stages/paths.py paths that no stage in dvc.yaml declares"
    assert len(data_paths) >= 14
    assert stage_order(stage_graph(REPO / "dvc.yaml"))[0] == "ingest"
