"""The paper's settings vs today's defaults (docs/defaults.md) from a real MLflow store: two models trained with
either value, or two guidance points of one run, paired prompt by prompt on the val split; the decision follows
a planted effect and is never typed in."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from knn_diffusion.evaluation.choices import CHOICES, Choice, choices_markdown, choices_table, decide
from knn_diffusion.evaluation.intervals import PointScores
from knn_diffusion.evaluation.runs import evaluate_runs
from knn_diffusion.tracking import child_run, stage_run

PROMPTS, SEEDS = 80, 2
REFERENCE = np.random.default_rng(0).normal(size=(PROMPTS, 6)).astype(np.float32)
AUX = next(c for c in CHOICES if c.key == "train_discrete.aux_weight")
GUIDANCE = Choice("guidance lambda", "Sec. 5", "discrete", "evaluate.discrete.guidance", 8.0, 3.0)


def scores(hit_rate: float, seed: int) -> PointScores:
    rng = np.random.default_rng(seed)
    n = PROMPTS * SEEDS
    return PointScores.from_rows(rng.uniform(0.1, 0.3, n), rng.random(n) < hit_rate, rng.normal(size=(n, 6)), SEEDS)


def log_discrete_model(experiment: str, aux_weight: float, points: dict[float, PointScores], tmp_path,
                       sampling: str = "uniform") -> None:
    """A train_discrete run with ``aux_weight`` and its val evaluate run: one k=10 point per guidance."""
    name = f"aux{aux_weight}-{sampling}"
    train_params = {"preset": "tiny", "aux_weight": aux_weight, "timestep_sampling": sampling}
    with stage_run("train_discrete", {"train_discrete": train_params}, experiment,
                   tags={"pipeline_run": name}) as train:
        pass
    common = {"split": "val", "fid_feature": "clip_image:feed", "variant": "tokens", "trained_k": 10,
              "model_run_id": train.id, "backbone": "discrete", "seeds": SEEDS, "prompts_sha256": "v" * 16}
    with stage_run("evaluate", {}, experiment, tags={"pipeline_run": name, "model": "discrete"},
                   run_name="evaluate@discrete") as stage:
        np.save(tmp_path / "reference.npy", REFERENCE)
        stage.artifact(tmp_path / "reference.npy", "scores")
        for guidance, values in points.items():
            point = f"k10-frac1-g{guidance:g}-openmoji"
            folder = tmp_path / name / point
            values.save(folder)
            settings = {"k": 10, "guidance": guidance, "index_fraction": 1.0, "index": "openmoji"}
            with child_run(point, {**common, **settings}, {"evaluate.kind": "grid_point"}) as run:
                run.metrics({"fid": 1.0, "kid_mean": 0.1, "kid_std": 0.0, "clip_score": float(values.clip.mean()),
                             "r_precision": float(values.hits.mean())})
                for part in sorted(folder.iterdir()):
                    run.artifact(part, "scores")


def rows(table, choice: Choice, metric: str):
    found = table[(table["choice"] == choice.name) & (table["key"] == choice.key) & (table["metric"] == metric)]
    assert len(found) == 1, table
    return found.iloc[0]


@pytest.mark.parametrize(("paper_rate", "default_rate", "keep"), [(0.5, 0.1, "paper"), (0.1, 0.5, "default")])
def test_the_decision_follows_a_planted_training_effect(tmp_path, paper_rate, default_rate, keep):
    experiment = f"choices-{keep}"
    log_discrete_model(experiment, 1.0, {8.0: scores(default_rate, seed=1)}, tmp_path)
    log_discrete_model(experiment, 0.0005, {8.0: scores(paper_rate, seed=2)}, tmp_path)
    # the default aux weight, but trained otherwise too: never the paper's value's counterpart
    log_discrete_model(experiment, 1.0, {8.0: scores(paper_rate, seed=5)}, tmp_path, sampling="importance")
    table = choices_table(evaluate_runs(MlflowClient(), experiment), MlflowClient(), choices=[AUX])
    planted = rows(table, AUX, "r_precision")
    assert planted["keep"] == keep and planted["a"] == pytest.approx(paper_rate, abs=0.1)
    assert planted["b"] == pytest.approx(default_rate, abs=0.1)
    assert (planted["ci_low"] > 0) == (keep == "paper") and (planted["ci_high"] < 0) == (keep == "default")
    assert f"**{keep}**" in choices_markdown(table)


def test_guidance_is_paired_within_one_run_and_identical_systems_keep_the_paper_value(tmp_path):
    same = scores(0.3, seed=3)
    log_discrete_model("choices-tie", 1.0, {3.0: same, 8.0: same}, tmp_path)
    table = choices_table(evaluate_runs(MlflowClient(), "choices-tie"), MlflowClient(), choices=[GUIDANCE, AUX])
    tie = rows(table, GUIDANCE, "r_precision")
    assert tie["difference"] == 0 and tie["verdict"] == "inconclusive" and tie["keep"] == "paper"
    assert rows(table, AUX, "fid")["verdict"].startswith("not measured")  # one aux weight only


def test_decide_counts_metrics_the_cis_favour():
    assert decide(["reproduced", "contradicted", "inconclusive"]) == "paper"
    assert decide(["contradicted", "contradicted", "reproduced"]) == "default"
    assert decide(["inconclusive"] * 3) == "paper"
