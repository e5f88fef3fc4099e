"""Ablation report from a real MLflow store of evaluate runs: table contents, sources, features, determinism."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow import MlflowClient

from knn_diffusion.cli import main as cli_main
from knn_diffusion.evaluation import metrics
from knn_diffusion.evaluation.metrics import Metric, metric_columns
from knn_diffusion.evaluation.report import write_report
from knn_diffusion.evaluation.runs import MixedFeaturesError, evaluate_runs
from knn_diffusion.tracking import child_run, stage_run

FEATURE = "clip_image:0123456789abcdef"


def log_model(experiment: str, variant: str, preset: str, k: int, fids: dict, pipeline_run: str,
              feature: str = FEATURE, backbone: str = "continuous") -> None:
    """A training run and one evaluate run with a child per point, as the stages log them."""
    with stage_run(f"train_{backbone}", {f"train_{backbone}": {"preset": preset, "variant": variant, "k": k}},
                   experiment, tags={"pipeline_run": pipeline_run}) as train:
        pass
    common = {"fid_feature": feature, "variant": variant, "trained_k": k, "model_run_id": train.id,
              "backbone": backbone}
    with stage_run("evaluate", {}, experiment, tags={"pipeline_run": pipeline_run, "dvc.dep.data/index": "abc",
                                                     "model": backbone}, run_name=f"evaluate@{backbone}"):
        for (point_k, fraction, guidance), fid in fids.items():
            if point_k == "baseline":
                name, params, kind = "retrieval_baseline", {"k": 1, "guidance": "-", "index_fraction": 1.0}, \
                    "retrieval_baseline"
            elif point_k == 0:
                name, params, kind = f"k0-g{guidance:g}", {"k": 0, "guidance": guidance, "index_fraction": "-",
                                                           "index": "-"}, "grid_point"
            else:
                name = f"k{point_k}-frac{fraction:g}-g{guidance:g}-openmoji"
                params = {"k": point_k, "guidance": guidance, "index_fraction": fraction, "index": "openmoji"}
                kind = "grid_point"
            with child_run(name, {**common, **params}, {"evaluate.kind": kind}) as run:
                run.metrics({"fid": fid, "kid_mean": fid / 100, "kid_std": 0.001, "clip_score": 0.3,
                             "r_precision": 0.5})


GRID = {(0, None, 3.0): 30.0, (1, 0.3, 3.0): 26.0, (1, 1.0, 3.0): 25.0, (10, 0.3, 3.0): 21.0,
        (10, 1.0, 3.0): 20.0, (10, 1.0, 1.0): 23.0, ("baseline", None, None): 28.0}


@pytest.fixture(scope="module")
def store():
    log_model("report-test", "tokens", "tiny", 10, GRID, "sweep-a")
    log_model("report-test", "no_knn", "tiny", 0, {(0, None, 3.0): 35.0, ("baseline", None, None): 28.0}, "sweep-b")
    log_model("report-test", "tokens", "35M", 10, {(0, None, 3.0): 25.0, (10, 1.0, 3.0): 15.0}, "sweep-c")
    return "report-test"


def test_tables_hold_the_logged_numbers_with_their_sources(store, tmp_path):
    runs = evaluate_runs(MlflowClient(), store)
    assert len(runs) == 7 + 2 + 2
    write_report(runs, tmp_path, title="t")
    by_k = pd.read_csv(tmp_path / "by_k.csv")
    tiny = by_k[(by_k["variant"] == "tokens") & (by_k["model_size"] == "tiny")]
    assert tiny["k"].tolist() == [0, 1, 10] and tiny["fid"].tolist() == [30.0, 25.0, 20.0]  # full index, g=3
    assert tiny["run_id"].str.len().eq(32).all() and tiny["git_commit"].str.len().gt(6).all()
    assert (tiny["data_version"].str.len() == 12).all() and tiny["dvc_deps"].str.contains("data/index").all()
    fractions = pd.read_csv(tmp_path / "by_index_fraction.csv")
    assert fractions[(fractions["k"] == 10) & (fractions["model_size"] == "tiny")]["fid"].tolist() == [21.0, 20.0]
    assert set(zip(fractions["model_size"], fractions["k"])) == {("tiny", 1), ("tiny", 10)}  # 35M: one fraction
    guidance = pd.read_csv(tmp_path / "by_guidance.csv")
    tiny_tokens = guidance[(guidance["model_size"] == "tiny") & (guidance["variant"] == "tokens")]
    assert tiny_tokens["guidance"].tolist() == [1.0, 3.0] and tiny_tokens["fid"].tolist() == [23.0, 20.0]
    sizes = pd.read_csv(tmp_path / "by_model_size.csv")
    assert set(zip(sizes["model_size"], sizes["variant"], sizes["fid"])) == {
        ("35M", "tokens", 15.0), ("tiny", "no_knn", 35.0), ("tiny", "tokens", 20.0)}
    knn = pd.read_csv(tmp_path / "knn_vs_no_knn.csv")
    tiny_knn = knn[(knn["variant"] == "tokens") & (knn["model_size"] == "tiny")].set_index("knn")["fid"]
    assert tiny_knn.to_dict() == {"kNN (k as trained)": 20.0, "no kNN at inference": 30.0}
    baseline = pd.read_csv(tmp_path / "model_vs_baseline.csv")
    assert set(baseline["system"]) == {"model", "retrieval baseline (1st neighbour)"}
    markdown = (tmp_path / "tables.md").read_text()
    assert f"`{FEATURE}`" in markdown and "## By k" in markdown and tiny["run_id"].iloc[0][:8] in markdown
    for plot in ("fid_vs_k.png", "fid_vs_index_fraction.png", "fid_vs_model_size.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")


def test_pipeline_run_filter_selects_one_sweep_experiment(store):
    runs = evaluate_runs(MlflowClient(), store, ["sweep-b"])
    assert set(runs["variant"]) == {"no_knn"} and len(runs) == 2


def test_report_regenerates_identical_files_and_logs_a_run(store, tmp_path, capsys):
    for out in ("first", "second"):
        cli_main(["report", "--experiment", store, "--out", str(tmp_path / out)])
    first = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert "tables.md" in first and "by_k.csv" in first
    for name in first:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
    client = MlflowClient()
    experiment = client.get_experiment_by_name(store).experiment_id
    reports = client.search_runs([experiment], "tags.stage = 'report'")
    assert len(reports) == 2
    logged = {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")}
    assert "report/tables.md" in logged and "report/fid_vs_k.png" in logged
    assert "logged to MLflow run" in capsys.readouterr().out


def test_mixing_fid_features_in_one_table_is_refused(store, tmp_path, capsys):
    log_model("report-mixed", "tokens", "tiny", 10, {(10, 1.0, 3.0): 20.0}, "a")
    log_model("report-mixed", "tokens", "tiny", 10, {(10, 1.0, 3.0): 12.0}, "b", feature="inception_v3_pool3:ff")
    runs = evaluate_runs(MlflowClient(), "report-mixed")
    with pytest.raises(MixedFeaturesError, match="2 feature networks.*cannot share a column"):
        write_report(runs, tmp_path, title="t")
    write_report(runs, tmp_path, title="t", feature="inception_v3_pool3:ff")
    assert pd.read_csv(tmp_path / "by_k.csv")["fid"].tolist() == [12.0]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", "--experiment", "report-mixed", "--out", str(tmp_path / "cli")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: the selected runs computed FID/KID on 2 feature networks")


def test_sweep_ends_with_the_report_logged_to_its_parent_run(store, tmp_path):
    import mlflow
    from prefect.logging import disable_run_logger

    from flows.sweep_tracking import write_sweep_report

    client = MlflowClient()
    parent = client.create_run(client.get_experiment_by_name(store).experiment_id, run_name="sweep s").info.run_id
    with disable_run_logger():
        tables = write_sweep_report.fn(tmp_path, mlflow.get_tracking_uri(), store, ["sweep-a", "sweep-cached"], "s",
                                       parent)
    text = (tmp_path / "outputs" / "report" / "s" / "tables.md").read_text()
    assert tables.endswith("tables.md") and "No evaluate run logged by sweep-cached" in text
    assert "sweep-b" not in text and "sweep-a" in text
    assert "report/by_k.csv" in {a.path for a in client.list_artifacts(parent, "report")}


def test_backbones_get_their_own_rows_at_their_own_guidance(tmp_path):
    """evaluate@continuous (guidance 3) and evaluate@discrete (lambda 8) in one pipeline run: each table keys
    rows by backbone, and each backbone's reference guidance is its own (not the mode over both)."""
    log_model("report-backbones", "tokens", "tiny", 10, GRID, "demo")
    log_model("report-backbones", "tokens", "tiny", 10, {(0, None, 8.0): 40.0, (10, 1.0, 8.0): 32.0,
                                                          ("baseline", None, None): 28.0}, "demo", backbone="discrete")
    runs = evaluate_runs(MlflowClient(), "report-backbones")
    write_report(runs, tmp_path, title="t")
    by_k = pd.read_csv(tmp_path / "by_k.csv")
    assert list(by_k.columns[:2]) == ["backbone", "variant"]
    assert set(zip(by_k["backbone"], by_k["k"], by_k["fid"])) == {
        ("continuous", 0, 30.0), ("continuous", 1, 25.0), ("continuous", 10, 20.0),
        ("discrete", 0, 40.0), ("discrete", 10, 32.0)}
    baseline = pd.read_csv(tmp_path / "model_vs_baseline.csv")
    assert sorted(zip(baseline["backbone"], baseline["system"])) == [
        ("continuous", "model"), ("continuous", "retrieval baseline (1st neighbour)"),
        ("discrete", "model"), ("discrete", "retrieval baseline (1st neighbour)")]


def test_score_quantile_points_give_the_fig8_plot(tmp_path):
    """Grid points with a per-query score quantile carry generated/neighbour score means and CIs: the
    report draws them as the paper's Fig. 8 and links the plot from tables.md."""
    log_model("report-quantiles", "tokens", "tiny", 10, GRID, "demo")
    common = {"fid_feature": FEATURE, "variant": "tokens", "trained_k": 10, "backbone": "continuous"}
    with stage_run("evaluate", {}, "report-quantiles", tags={"pipeline_run": "demo", "model": "continuous"},
                   run_name="evaluate@continuous"):
        for quantile in (1, 3, 5):
            params = {"k": 10, "guidance": 3.0, "index_fraction": 1.0, "index": "openmoji", "score_quantile": quantile}
            with child_run(f"k10-frac1-g3-openmoji-q{quantile}", {**common, **params},
                           {"evaluate.kind": "grid_point"}) as run:
                run.metrics({"fid": 20.0, "kid_mean": 0.2, "kid_std": 0.001, "clip_score": 0.3, "r_precision": 0.5,
                             **{f"{name}{suffix}": quantile + offset for name in ("generated_score", "neighbour_score")
                                for suffix, offset in (("", 0.0), ("_ci_low", -0.5), ("_ci_high", 0.5))}})
    written = write_report(evaluate_runs(MlflowClient(), "report-quantiles"), tmp_path, title="t")
    assert tmp_path / "score_quantiles.png" in written
    assert "![](score_quantiles.png)" in (tmp_path / "tables.md").read_text()


def test_every_metric_of_the_table_is_a_report_column(tmp_path, monkeypatch):
    """A metric added to the evaluation's table reaches the report's tables without touching report.py."""
    monkeypatch.setattr(metrics, "METRICS", [*metrics.METRICS, Metric(("planted",), lambda scorer, scored: (1.0,))])
    with stage_run("evaluate", {}, "report-planted", tags={"dvc.dep.data/index": "abc", "model": "continuous"},
                   run_name="evaluate@continuous"):
        with child_run("k0-g3", {"fid_feature": FEATURE, "variant": "tokens", "trained_k": 1, "backbone": "continuous",
                                 "k": 0, "guidance": 3.0, "index_fraction": "-", "index": "-"},
                       {"evaluate.kind": "grid_point"}) as run:
            run.metrics({column: 0.5 for column in metric_columns()})
    runs = evaluate_runs(MlflowClient(), "report-planted")
    assert runs["planted"].tolist() == [0.5]
    write_report(runs, tmp_path, title="t")
    assert pd.read_csv(tmp_path / "by_k.csv")["planted"].tolist() == [0.5]


def test_a_run_without_a_metric_shows_an_empty_cell_beside_runs_with_intervals():
    from knn_diffusion.evaluation.tables import with_intervals

    # a trial restored from DVC's run cache logs no evaluate run: its row has None, not NaN, in an object column
    frame = pd.DataFrame({"fid": [0.25, None, 0.5], "fid_ci_low": [0.2, None, None],
                          "fid_ci_high": [0.3, None, None]}, dtype=object)
    assert with_intervals(frame)["fid"].tolist() == ["0.25 [0.2, 0.3]", "", "0.5"]
