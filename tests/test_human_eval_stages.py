"""The two DVC stages with a real MLflow store: package (zip, preview, screenshot), then aggregate before and
after answers arrive, with the results also logged on the run that made system A."""

from __future__ import annotations

import json
import zipfile

import mlflow
import pytest
import yaml

from knn_diffusion.human_eval.report import report_section
from knn_diffusion.stages import human_eval, human_eval_aggregate, paths
from tests.human_eval_helpers import write_systems

EXPERIMENT = "human-eval-stages"


@pytest.fixture
def packaged(in_tmp, request):
    """Systems under outputs/, a run standing for the one that trained A, and the packaging stage run
    (with a chromium screenshot only when parametrized so: it takes seconds)."""
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="train_continuous") as producer:
        pass
    write_systems(in_tmp / "outputs", run_id_a=producer.info.run_id)
    (in_tmp / "params.yaml").write_text(yaml.safe_dump({
        "human_eval": {"system_a": "outputs/A", "system_b": "outputs/B", "name_b": "retrieval_baseline",
                       "raters": 2, "base_url": "https://bucket.example/study/",
                       "screenshot": getattr(request, "param", False)},
        "human_eval_aggregate": {"results_dir": "results"},
        "tracking": {"experiment": EXPERIMENT}}))
    human_eval.main([])
    return in_tmp, producer.info.run_id, json.loads((in_tmp / paths.HUMAN_EVAL_KEY).read_text())


def _run(name):
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=f"attributes.run_name = '{name}'",
                              output_format="list")
    return runs[0]


@pytest.mark.parametrize("packaged", [True], indirect=True)
def test_packaging_stage_outputs_and_artifacts(packaged):
    root, _, key = packaged
    assert not (root / paths.HUMAN_EVAL_PACKAGE / "key.json").exists()
    metrics = json.loads((root / paths.HUMAN_EVAL_METRICS).read_text())
    assert metrics["pairs"] == 6 and metrics["package_bytes"] > 0
    run = _run("human_eval")
    assert run.info.status == "FINISHED" and run.data.tags["package_id"] == key["package_id"]
    assert run.data.tags["system_a"] == "A" and run.data.tags["system_b"] == "retrieval_baseline"
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(run.info.run_id, "human_eval")}
    assert {"human_eval/preview_a_left_b_right.png", f"human_eval/human_eval_package_{key['package_id']}.zip",
            "human_eval/task_screen.png"} <= names
    archive = client.download_artifacts(run.info.run_id, f"human_eval/human_eval_package_{key['package_id']}.zip",
                                        str(root / "dl"))
    listed = set(zipfile.ZipFile(archive).namelist())
    assert {"quality.html", "alignment.html", "mturk/quality-input.csv", "package.json"} <= listed
    assert not any("key" in name for name in listed)


def test_aggregate_before_answers_succeeds_without_metrics(packaged, caplog):
    root, producer, _ = packaged
    with caplog.at_level("INFO"):
        human_eval_aggregate.main([])
    assert "no result files (*.csv) in results yet" in caplog.text
    assert "no answers yet" in (root / paths.HUMAN_EVAL_TABLE).read_text()
    assert json.loads((root / paths.HUMAN_EVAL_AGGREGATE_METRICS).read_text()) == {}
    assert _run("human_eval_aggregate").data.metrics == {}
    assert mlflow.get_run(producer).data.metrics == {}
    experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    assert report_section(mlflow.MlflowClient(), experiment_id) == ""  # the ablation report leaves it out


def test_aggregate_logs_on_its_run_and_on_system_as_run(packaged):
    root, producer, key = packaged
    (root / "results").mkdir()
    rows = ["package_id,question,pair_id,rater_id,choice,answered_at"]
    for pair in key["pairs"]:  # both raters always pick system A
        rows += [f"{key['package_id']},quality,{pair['pair_id']},{rater},{pair['a_side']}," for rater in ("r1", "r2")]
    (root / "results" / "answers.csv").write_text("\n".join(rows) + "\n")
    human_eval_aggregate.main([])
    metrics = json.loads((root / paths.HUMAN_EVAL_AGGREGATE_METRICS).read_text())
    assert metrics["quality.pct_prefer_a"] == 100.0 and metrics["quality.pairs"] == 6
    assert _run("human_eval_aggregate").data.metrics["quality.pct_prefer_a"] == 100.0
    produced = mlflow.get_run(producer).data
    assert produced.metrics["human_eval.retrieval_baseline.quality.pct_prefer_a"] == 100.0
    assert produced.tags["human_eval.retrieval_baseline.package_id"] == key["package_id"]
    assert produced.tags["human_eval.baselines"] == "retrieval_baseline"
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(producer, "human_eval")] == [
        "human_eval/vs_retrieval_baseline.md"]
    table = (root / paths.HUMAN_EVAL_TABLE).read_text()
    assert "| retrieval_baseline | 100.0% [61.0, 100.0] | no answers yet |" in table
    section = report_section(mlflow.MlflowClient(), mlflow.get_experiment_by_name(EXPERIMENT).experiment_id)
    run_id = _run("human_eval_aggregate").info.run_id
    assert f"| A | retrieval_baseline | 100.0% [61.0, 100.0] | no answers yet | 6 | {run_id[:8]} |" in section


def test_bad_results_end_in_one_error_line(packaged, capsys):
    root, _, key = packaged
    (root / "results").mkdir()
    (root / "results" / "answers.csv").write_text("package_id,question,pair_id,rater_id,choice,answered_at\n"
                                                  f"{key['package_id']},quality,p0001,r1,up,\n")
    with pytest.raises(SystemExit) as exit_info:
        human_eval_aggregate.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "results/answers.csv:2: answer 'up': expected Left or Right" in err
    assert "Traceback" not in err


def test_missing_system_folder_is_an_error_line(in_tmp, capsys):
    (in_tmp / "params.yaml").write_text(yaml.safe_dump({"human_eval": {"system_a": "nowhere", "system_b": "x"},
                                                        "tracking": {"experiment": EXPERIMENT}}))
    with pytest.raises(SystemExit) as exit_info:
        human_eval.main([])
    assert exit_info.value.code == 2
    assert "error: nowhere: not a folder of generated images" in capsys.readouterr().err


def test_point_evaluate_did_not_produce_gives_no_package_and_both_stages_succeed(in_tmp):
    """A sweep trial of a no_knn model has no kNN evaluate point: no package, no failure, said in the log."""
    from knn_diffusion.io import read_json
    from knn_diffusion.stages import human_eval, human_eval_aggregate, paths

    (in_tmp / "params.yaml").write_text(yaml.safe_dump({"human_eval": {
        "system_a": "outputs/evaluate/continuous/k10-frac1-g3-openmoji",
        "system_b": "outputs/evaluate/continuous/retrieval_baseline"}, "tracking": {"experiment": EXPERIMENT}}))
    paths.evaluate_dir("continuous").mkdir(parents=True)  # evaluate ran, but produced neither point
    human_eval.main([])
    assert read_json(paths.HUMAN_EVAL_METRICS)["pairs"] == 0
    assert read_json(paths.HUMAN_EVAL_KEY)["missing"] == ["outputs/evaluate/continuous/k10-frac1-g3-openmoji",
                                                          "outputs/evaluate/continuous/retrieval_baseline"]
    human_eval_aggregate.main([])
    assert read_json(paths.HUMAN_EVAL_AGGREGATE_METRICS) == {}
    assert "not produced" in paths.HUMAN_EVAL_TABLE.read_text()


def test_edit_study_answers_are_aggregated_by_its_own_stage(in_tmp):
    """human_eval_manipulation's package, then human_eval_aggregate_manipulation before and after answers: the
    edit questions get the paper's table, and the ablation report shows them beside any generation study."""
    from knn_diffusion.stages import human_eval_aggregate_manipulation, human_eval_manipulation

    mlflow.set_experiment(EXPERIMENT)
    write_systems(in_tmp / "outputs")
    (in_tmp / "params.yaml").write_text(yaml.safe_dump({
        "human_eval_manipulation": {"system_a": "outputs/A", "system_b": "outputs/B", "name_a": "edit",
                                    "name_b": "text_to_image", "raters": 2, "screenshot": False},
        "human_eval_aggregate_manipulation": {"results_dir": "edit-answers"},
        "tracking": {"experiment": EXPERIMENT}}))
    human_eval_manipulation.main([])
    (in_tmp / "edit-answers").mkdir()
    human_eval_aggregate_manipulation.main([])
    assert json.loads((in_tmp / paths.HUMAN_EVAL_AGGREGATE_MANIPULATION_METRICS).read_text()) == {}
    assert "no answers yet" in (in_tmp / paths.HUMAN_EVAL_MANIPULATION_TABLE).read_text()

    key = json.loads((in_tmp / paths.HUMAN_EVAL_MANIPULATION_KEY).read_text())
    assert key["questions"] == ["edit_alignment", "edit_identity"]
    rows = ["package_id,question,pair_id,rater_id,choice,answered_at"]
    for pair in key["pairs"]:  # both raters say A keeps the object better
        rows += [f"{key['package_id']},edit_identity,{pair['pair_id']},{rater},{pair['a_side']}," for rater in "xy"]
    (in_tmp / "edit-answers" / "answers.csv").write_text("\n".join(rows) + "\n")
    human_eval_aggregate_manipulation.main([])
    metrics = json.loads((in_tmp / paths.HUMAN_EVAL_AGGREGATE_MANIPULATION_METRICS).read_text())
    assert metrics["edit_identity.pct_prefer_a"] == 100.0 and "edit_alignment.pct_prefer_a" not in metrics
    table = (in_tmp / paths.HUMAN_EVAL_MANIPULATION_TABLE).read_text()
    assert "| Ours vs. | Edit matches the text | Keeps the object |" in table
    assert "| text_to_image | no answers yet | 100.0% [61.0, 100.0] |" in table
    assert not (in_tmp / paths.HUMAN_EVAL_TABLE).exists()  # the generation study's outputs are not touched
    section = report_section(mlflow.MlflowClient(), mlflow.get_experiment_by_name(EXPERIMENT).experiment_id)
    row = next(line for line in section.splitlines() if line.startswith("| edit | text_to_image |"))
    # other tests' generation studies share this experiment: their questions are columns that read "-" here
    assert row.removeprefix("| edit | text_to_image |").lstrip(" -|").startswith(
        "no answers yet | 100.0% [61.0, 100.0] | 6 |"), row


def test_every_question_has_a_table_heading():
    from knn_diffusion.human_eval.aggregate import HEADLINE
    from knn_diffusion.human_eval.config import Question

    assert set(HEADLINE) == {q.value for q in Question}
