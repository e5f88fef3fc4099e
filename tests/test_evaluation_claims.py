"""The report's claims table from a real MLflow store: the per-image values of two models' evaluate runs are
paired prompt by prompt, and the verdict follows a planted effect (never typed in)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from knn_diffusion.evaluation.claims import CLAIMS, NOT_MEASURED, knn_at_inference
from knn_diffusion.evaluation.intervals import PointScores
from knn_diffusion.evaluation.report import write_report
from knn_diffusion.evaluation.runs import evaluate_runs
from knn_diffusion.tracking import child_run, stage_run

FEATURE = "clip_image:feedfeedfeedfeed"
PROMPTS, SEEDS = 80, 2
REFERENCE = np.random.default_rng(0).normal(size=(PROMPTS, 6)).astype(np.float32)


def scores(hit_rate: float, shift: float, seed: int) -> PointScores:
    rng = np.random.default_rng(seed)
    n = PROMPTS * SEEDS
    return PointScores.from_rows(rng.uniform(0.1, 0.3, n), rng.random(n) < hit_rate,
                                 rng.normal(shift, 1.0, size=(n, 6)), SEEDS)


def log_scored_model(experiment: str, variant: str, points: dict[str, tuple[int, PointScores]], tmp_path,
                     pipeline_run: str, prompts: str = "p" * 16, preset: str = "tiny") -> None:
    """A training run and an evaluate run whose points carry their per-image values, as the stage logs them."""
    with stage_run("train_continuous", {"train_continuous": {"preset": preset, "variant": variant, "k": 10}},
                   experiment, tags={"pipeline_run": pipeline_run}) as train:
        pass
    common = {"fid_feature": FEATURE, "variant": variant, "trained_k": 10, "model_run_id": train.id,
              "backbone": "continuous", "seeds": SEEDS, "prompts_sha256": prompts}
    with stage_run("evaluate", {}, experiment, tags={"pipeline_run": pipeline_run, "model": "continuous"},
                   run_name="evaluate@continuous") as stage:
        np.save(tmp_path / "reference.npy", REFERENCE)
        stage.artifact(tmp_path / "reference.npy", "scores")
        for name, (k, values) in points.items():
            folder = tmp_path / pipeline_run / name
            values.save(folder)
            settings = {"k": k, "guidance": 3.0, "index_fraction": 1.0 if k else "-", "index": "openmoji" if k else "-"}
            with child_run(name, {**common, **settings}, {"evaluate.kind": "grid_point"}) as run:
                run.metrics({"fid": 1.0, "kid_mean": 0.1, "kid_std": 0.0, "clip_score": float(values.clip.mean()),
                             "r_precision": float(values.hits.mean())})
                for part in sorted(folder.iterdir()):
                    run.artifact(part, "scores")


def claim_rows(table: pd.DataFrame, metric: str, compared: str) -> pd.Series:
    rows = table[(table["metric"] == metric) & (table["compared"] == compared)]
    assert len(rows) == 1, table[["claim", "compared"]]
    return rows.iloc[0]


def test_verdicts_follow_a_planted_effect_and_every_claim_is_listed(tmp_path):
    no_knn = scores(0.10, 0.0, seed=1)
    log_scored_model("claims", "tokens", {"k10-frac1-g3-openmoji": (10, scores(0.45, 0.0, seed=2)),
                                          "k0-g3": (0, scores(0.10, 0.0, seed=3))}, tmp_path, "knn")
    log_scored_model("claims", "no_knn", {"k0-g3": (0, no_knn)}, tmp_path, "none")
    write_report(evaluate_runs(MlflowClient(), "claims"), tmp_path / "report", title="t", client=MlflowClient())
    table = pd.read_csv(tmp_path / "report" / "claims.csv")
    planted = claim_rows(table, "r_precision", "tokens vs no_knn, tiny")
    assert planted["verdict"] == "reproduced" and planted["ci_low"] > 0
    assert abs(planted["difference"] - (planted["a"] - planted["b"])) < 1e-9
    fid = claim_rows(table, "fid", "tokens vs no_knn, tiny")
    assert fid["verdict"] in {"inconclusive", "reproduced", "contradicted"} and fid["ci_low"] < fid["ci_high"]
    assert set(table["claim"]) == {claim.name for claim in CLAIMS}  # unmeasured claims are listed, not dropped
    assert table.loc[table["compared"] == "-", "verdict"].str.startswith(NOT_MEASURED).all()
    markdown = (tmp_path / "report" / "tables.md").read_text()
    assert markdown.index("## Claims of the paper") < markdown.index("## By k") and "**reproduced**" in markdown
    assert "never on test" in markdown


def test_identical_systems_are_inconclusive_and_other_prompts_are_not_paired(tmp_path):
    same = scores(0.2, 0.0, seed=4)
    log_scored_model("claims-null", "tokens", {"k10-frac1-g3-openmoji": (10, same), "k0-g3": (0, same)}, tmp_path,
                     "knn")
    log_scored_model("claims-null", "no_knn", {"k0-g3": (0, same)}, tmp_path, "none", prompts="q" * 16)
    write_report(evaluate_runs(MlflowClient(), "claims-null"), tmp_path / "report", title="t", client=MlflowClient())
    table = pd.read_csv(tmp_path / "report" / "claims.csv")
    assert claim_rows(table, "fid", "k=10 vs k=0")["verdict"] == "inconclusive"
    unpaired = claim_rows(table, "r_precision", "tokens vs no_knn, tiny")
    assert unpaired["verdict"] == f"{NOT_MEASURED}: other prompts or seeds"


def test_inference_claims_use_the_largest_model_not_the_latest(tmp_path):
    """The study evaluates a smaller second size after the main model: k=10 vs k=0 stays the main model's."""
    log_scored_model("claims-size", "tokens", {"k10-frac1-g3-openmoji": (10, scores(0.45, 0.0, seed=5)),
                                               "k0-g3": (0, scores(0.10, 0.0, seed=6))}, tmp_path, "tiny")
    same = scores(0.2, 0.0, seed=7)
    log_scored_model("claims-size", "tokens", {"k10-frac1-g3-openmoji": (10, same), "k0-g3": (0, same)}, tmp_path,
                     "micro", preset="micro")
    runs = evaluate_runs(MlflowClient(), "claims-size")
    (claim,) = [c for c in CLAIMS if c.pairs is knn_at_inference]
    ((label, a, b),) = claim.pairs(runs[runs["backbone"] == "continuous"])
    assert (a["model_size"], b["model_size"]) == ("tiny", "tiny") and a["r_precision"] > b["r_precision"]
