"""The evaluate stage on a real miniature pipeline: grid points, child runs, outputs, the baseline."""

from __future__ import annotations

import csv
import json

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from knn_diffusion.encoders.factory import load_open_clip
from knn_diffusion.evaluation.intervals import interval_columns
from knn_diffusion.retrieval.subsets import subset_mask
from knn_diffusion.stack.services import mlflow_server
from knn_diffusion.stages import embed, encoder, evaluate, index, ingest, judge, judging, knn, paths, train_continuous
from tests.browser import chromium_page, row_cells, show_columns
from tests.conftest import copy_outputs
from tests.continuous_helpers import write_micro_preset
from tests.test_encoders import TINY_CLIP

EXPERIMENT = "evaluate-stage"
TINY = {
    "data": {"datasets": {"openmoji": {"source": "openmoji", "limit": 160}}},
    "embed": {"shard_size": 100},
    "index": {"tune_queries": 20},
    "knn": {"k_max": 10},  # >= every default k (train_discrete.k) the params cross-check compares with it
    "train_continuous": {"k": 3, "batch_size": 4, "max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2,
                         "sample_every": 0, "log_every": 1, "sampling": {"steps": 2}},
    "evaluate": {"count": 8, "batch_size": 8, "kid_subsets": 5, "kid_subset_size": 4,
                 "r_precision_candidates": 4, "grid_prompts": 3, "continuous": {"steps": 2, "guidance": [3.0]},
                 "grid": {"k": [0, 2], "index_fraction": [0.5, 1.0], "index": ["openmoji"]}},
    "tracking": {"experiment": EXPERIMENT},
}
POINTS = ["k0-g3", "k2-frac0.5-g3-openmoji", "k2-frac1-g3-openmoji"]


def tiny_pretrained_clip(folder, seed: int = 0) -> dict:
    """A tiny open_clip saved as a local "pretrained" file: the encoder (or judge) stage then trains nothing."""
    arch = folder / "tiny-eval-clip.json"
    arch.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(seed)
    weights = folder / f"tiny-eval-clip-{seed}.pt"
    torch.save(load_open_clip(str(arch)).model.state_dict(), weights)
    return {"kind": "open_clip", "model_name": str(arch), "pretrained": str(weights)}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The stages up to training once, then evaluate; tests below inspect the outputs and runs."""
    root = tmp_path_factory.mktemp("evaluate")
    train = {**TINY["train_continuous"], "preset": write_micro_preset(root)}
    (root / "params.yaml").write_text(yaml.safe_dump({**TINY, "encoder": tiny_pretrained_clip(root),
                                                      "judge": tiny_pretrained_clip(root, seed=1),
                                                      "train_continuous": train}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in (ingest, encoder, judge, embed, index, knn, train_continuous, evaluate):
            stage.main([])
        yield root


def evaluate_runs():
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string="tags.stage = 'evaluate'",
                              output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_metrics_file_holds_only_numbers_per_point_and_baseline(evaluated):
    report = json.loads((evaluated / paths.evaluate_metrics("continuous")).read_text())
    assert set(report) == {*POINTS, "retrieval_baseline", "differences", "seconds"}
    for name in [*POINTS, "retrieval_baseline"]:
        assert set(report[name]) == {"fid", "kid_mean", "kid_std", "clip_score", "r_precision",
                                     *interval_columns()}
        assert all(isinstance(v, float) and np.isfinite(v) for v in report[name].values())
        assert 0 <= report[name]["r_precision"] <= 1
        for metric in ("fid", "kid_mean", "clip_score", "r_precision"):  # every estimate inside its 95% CI
            assert report[name][f"{metric}_ci_low"] <= report[name][metric] <= report[name][f"{metric}_ci_high"]
    # every retrieving point and the baseline against no kNN at its guidance, paired
    differences = report["differences"]
    assert set(differences) == {f"{p} - k0-g3" for p in [*POINTS[1:], "retrieval_baseline"]}
    for name, values in differences.items():
        point = report[name.split(" - ")[0]]
        assert values["clip_score"] == pytest.approx(point["clip_score"] - report["k0-g3"]["clip_score"], abs=1e-5)
        assert values["fid"] == pytest.approx(point["fid"] - report["k0-g3"]["fid"], rel=1e-3, abs=1e-4)
        assert values["r_precision_ci_low"] <= values["r_precision"] <= values["r_precision_ci_high"]


def test_each_point_is_a_generate_folder_with_its_settings(evaluated):
    out = evaluated / paths.evaluate_dir("continuous")
    facts = json.loads((out / "evaluate.json").read_text())
    prompts = facts["prompts"]
    assert len(prompts) == 8 and all(p.startswith("an emoji of ") for p in prompts)
    allowed, seeds = None, {}
    for name, k, fraction in [("k0-g3", 0, 1.0), ("k2-frac0.5-g3-openmoji", 2, 0.5), ("k2-frac1-g3-openmoji", 2, 1.0)]:
        sidecars = [json.loads(p.read_text()) for p in sorted((out / name).glob("0*.json"))]
        assert [s["prompt"] for s in sidecars] == prompts and (out / name / "grid.png").is_file()
        seeds[name] = [s["seed"] for s in sidecars]
        assert all(s["k"] == k and len(s["neighbour_ids"]) == k for s in sidecars)
        if k and fraction < 1:
            ids = np.array([i for s in sidecars for i in s["neighbour_ids"]])
            allowed = subset_mask(ids, fraction, seed=0)
            assert allowed.all() and sidecars[0]["index_fraction"] == 0.5
    assert allowed is not None
    assert len({tuple(s) for s in seeds.values()}) == 1 and len(set(seeds["k0-g3"])) == len(prompts)  # shared seeds
    baseline = [json.loads(p.read_text()) for p in sorted((out / "retrieval_baseline").glob("0*.json"))]
    assert [b["prompt"] for b in baseline] == prompts and all(len(b["neighbour_ids"]) == 1 for b in baseline)
    with open(out / "points.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["point"] for r in rows] == [*POINTS, "retrieval_baseline"]
    assert rows[0]["index_fraction"] == "-" and rows[1]["index_fraction"] == "0.5"


def test_baseline_images_are_the_retrieved_training_images(evaluated):
    from PIL import Image

    from knn_diffusion.data.store import ImageStore

    store = ImageStore.open(evaluated / paths.dataset_dir("openmoji"))
    folder = evaluated / paths.evaluate_dir("continuous") / "retrieval_baseline"
    first = json.loads(sorted(folder.glob("0*.json"))[0].read_text())
    image = np.asarray(Image.open(folder / first["image"]).convert("RGB"))
    assert np.array_equal(image, store[first["neighbour_ids"][0]])
    train_rows = set(store.rows("train").tolist())
    assert first["neighbour_ids"][0] in train_rows  # the index holds no test image


def test_one_child_run_per_point_under_the_stage_run(evaluated):
    parents, children = evaluate_runs()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {*POINTS, "retrieval_baseline"}
    point = by_name["k2-frac0.5-g3-openmoji"]
    assert point.data.params["k"] == "2" and point.data.params["index_fraction"] == "0.5"
    assert point.data.params["guidance"] == "3.0" and point.data.params["index"] == "openmoji"
    assert point.data.params["fid_feature"].startswith("clip_image:")
    assert {"fid", "kid_mean", "kid_std", "clip_score", "r_precision", "images_per_s", *interval_columns()} \
        <= set(point.data.metrics)
    artifacts = {a.path for a in MlflowClient().list_artifacts(point.info.run_id, "scores")}
    assert artifacts == {f"scores/{part}.npy" for part in ("clip", "hits", "features")}
    assert point.data.tags["git.commit"] == parent.data.tags["git.commit"]
    assert parent.info.run_name == parent.data.tags["dvc.stage"] == "evaluate@continuous"
    assert {c.data.tags["model"] for c in children} == {parent.data.tags["model"]} == {"continuous"}
    assert point.data.params["backbone"] == "continuous" and point.data.params["scheduler"] == "dpm_solver_pp_sde"
    report = json.loads((evaluated / paths.evaluate_metrics("continuous")).read_text())
    assert point.data.metrics["fid"] == pytest.approx(report["k2-frac0.5-g3-openmoji"]["fid"], abs=1e-6)


def test_the_judge_scores_not_the_retrieval_encoder(evaluated, monkeypatch):
    from knn_diffusion.config import load_params
    from knn_diffusion.encoders.factory import load_encoder

    monkeypatch.chdir(evaluated)
    params = load_params()
    retriever = load_encoder(params.encoder, paths.ENCODER).fingerprint
    judged = load_encoder(params.judge, paths.JUDGE).fingerprint
    assert retriever != judged
    _, children = evaluate_runs()
    assert {c.data.params["judge"] for c in children} == {f"open_clip:{judged[:16]}"}
    assert {c.data.params["fid_feature"] for c in children} == {f"clip_image:{judged[:16]}"}
    sidecar = json.loads((evaluated / paths.evaluate_dir("continuous") / "evaluate.json").read_text())
    assert sidecar["judge"] == f"open_clip:{judged[:16]}"
    circular = load_params(overrides=["evaluate.judge=retrieval_encoder"])
    assert judging.load_judge(circular).fingerprint == retriever  # circular only when asked for


def test_score_quantile_points_draw_the_papers_fig8(evaluated, tmp_path, monkeypatch):
    """The per-query score quantile as a grid axis: each quantile point scores its generated images and
    their neighbours (means with bootstrap CIs), and the stage draws Fig. 8 from them."""
    root = copy_outputs(evaluated, tmp_path / "quantiles", "data", "models")
    monkeypatch.chdir(root)
    evaluate.main(["evaluate.retrieval_baseline=false", "evaluate.grid.k=[2]", "evaluate.grid.index_fraction=[1.0]",
                   "evaluate.grid.score_quantile=[1,2]", "retrieval.score_quantiles=2"])
    out = root / paths.evaluate_dir("continuous")
    rows = list(csv.DictReader(open(out / "score_quantiles.csv")))
    assert [r["point"] for r in rows] == ["k2-frac1-g3-openmoji-q1", "k2-frac1-g3-openmoji-q2"]
    for row in rows:
        for name in ("generated_score", "neighbour_score"):
            assert float(row[f"{name}_ci_low"]) <= float(row[name]) <= float(row[f"{name}_ci_high"])
    # the neighbours of the high quantile score higher than those of the low one, query by query
    assert float(rows[0]["neighbour_score"]) < float(rows[1]["neighbour_score"])
    assert (out / "score_quantiles.png").stat().st_size > 0
    record = json.loads(next((out / "k2-frac1-g3-openmoji-q2").glob("0000-*.json")).read_text())
    assert record["score_quantile"] == [2, 2]


def test_whole_test_split_times_seeds(evaluated, tmp_path, monkeypatch):
    """evaluate.count=0 takes every captioned test image; evaluate.seeds=2 generates each prompt twice,
    every image with its own noise seed, the same seeds at every point; per-image values are kept."""
    from knn_diffusion.data.store import ImageStore
    from knn_diffusion.evaluation.intervals import PointScores

    root = copy_outputs(evaluated, tmp_path / "seeds", "data", "models")
    monkeypatch.chdir(root)
    evaluate.main(["evaluate.count=0", "evaluate.seeds=2", "evaluate.retrieval_baseline=false",
                   "evaluate.grid.k=[0,2]", "evaluate.grid.index_fraction=[1.0]", "evaluate.r_precision_candidates=3"])
    store = ImageStore.open(paths.dataset_dir("openmoji"))
    named = store.read_captions().loc[store.rows("test")].dropna()
    prompts = json.loads((root / paths.evaluate_dir("continuous") / "evaluate.json").read_text())["prompts"]
    assert len(prompts) == (named.str.strip() != "").sum() >= 2
    out = root / paths.evaluate_dir("continuous")
    seeds = {}
    for point in ("k0-g3", "k2-frac1-g3-openmoji"):
        sidecars = [json.loads(p.read_text()) for p in sorted((out / point).glob("0*.json"))]
        assert [s["prompt"] for s in sidecars] == prompts * 2
        seeds[point] = [s["seed"] for s in sidecars]
        scores = PointScores.load(out / "scores" / point)
        assert scores.clip.shape == scores.hits.shape == (len(prompts), 2) and len(scores.features) == 2 * len(prompts)
    assert seeds["k0-g3"] == seeds["k2-frac1-g3-openmoji"] == list(range(2 * len(prompts)))
    differences = json.loads((root / paths.evaluate_metrics("continuous")).read_text())["differences"]
    assert set(differences) == {"k2-frac1-g3-openmoji - k0-g3"}


def test_rerun_writes_identical_outputs(evaluated, monkeypatch):
    # Ends with the default grid's evaluate run as the newest one, which the UI test below expands.
    monkeypatch.chdir(evaluated)
    out = evaluated / paths.evaluate_dir("continuous")
    before = (out / "points.csv").read_bytes()
    grid = (out / "grid.png").read_bytes()
    evaluate.main(["evaluate.retrieval_baseline=false", "evaluate.grid.k=[2]", "evaluate.grid.index_fraction=[0.5]"])
    assert (out / "points.csv").read_text().splitlines()[1] == before.decode().splitlines()[2]
    evaluate.main(["--model", "continuous"])
    assert (out / "points.csv").read_bytes() == before
    assert (out / "grid.png").read_bytes() == grid


def test_missing_prompts_file_is_one_error_line(evaluated, monkeypatch, capsys):
    monkeypatch.chdir(evaluated)
    before = (evaluated / paths.evaluate_metrics("continuous")).read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["evaluate.prompts_file=prompts/nowhere.txt"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: prompts file prompts/nowhere.txt: not found"
    assert (evaluated / paths.evaluate_metrics("continuous")).read_bytes() == before


@pytest.fixture
def mlflow_ui(evaluated, tmp_path):
    """``mlflow server`` on a free loopback port over the tests' store; stopped after."""
    with mlflow_server(tmp_path, mlflow.get_tracking_uri(), str(tmp_path / "artifacts")) as uri:
        yield uri


def test_mlflow_ui_lists_the_grid_points_with_their_params(mlflow_ui, tmp_path):
    """Headless Chromium on the experiment's runs table (not the GenAI view MLflow 3 opens by default)."""

    experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    with chromium_page() as page:
        page.goto(f"{mlflow_ui}/#/experiments/{experiment}/runs")
        parent = page.get_by_role("row").filter(has_text="evaluate")  # the stage run; its points are k*-g*
        parent.first.wait_for(timeout=90_000)
        parent.first.locator("button").first.click()  # expand: the child runs are nested under it
        page.get_by_role("row").filter(has_text="k0-g3").first.wait_for(timeout=30_000)
        show_columns(page, ["k", "index_fraction", "guidance", "fid"])  # the grid params as columns
        page.screenshot(path=tmp_path / "mlflow-runs.png")
        cells = {point: row_cells(page, point) for point in [*POINTS, "retrieval_baseline"]}
    assert {"3.0", "0.5", "2"} <= set(cells["k2-frac0.5-g3-openmoji"])
    assert {"3.0", "1.0", "2"} <= set(cells["k2-frac1-g3-openmoji"])
    assert "0" in cells["k0-g3"] and "0.5" not in cells["k0-g3"]
    assert "1" in cells["retrieval_baseline"]


def test_human_eval_packages_a_grid_point_against_the_retrieval_baseline(evaluated, monkeypatch):
    """The demo's human-evaluation wiring in miniature: an evaluate grid point (A) paired by prompt with the
    retrieval baseline (B); A's sidecars name the training run, where the aggregate will log."""
    from knn_diffusion.stages import human_eval

    monkeypatch.chdir(evaluated)
    human_eval.main(["human_eval.system_a=outputs/evaluate/continuous/k2-frac1-g3-openmoji",
                     "human_eval.screenshot=false"])
    key = json.loads((evaluated / paths.HUMAN_EVAL_KEY).read_text())
    prompts = json.loads((evaluated / paths.evaluate_dir("continuous") / "evaluate.json").read_text())["prompts"]
    assert sorted(p["prompt"] for p in key["pairs"]) == sorted(prompts)
    assert key["system_b"]["name"] == "retrieval_baseline"
    trained = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string="tags.stage = 'train_continuous'",
                                 output_format="list")
    assert key["system_a"]["model_run_id"] == trained[0].info.run_id
    images = sorted((evaluated / paths.HUMAN_EVAL_PACKAGE / "images").glob("*.png"))
    assert len(images) == 2 * len(prompts)
