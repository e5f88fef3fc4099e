"""Settings the paper states, measured against today's default on the val split: which one to keep.

A choice is one params key with the paper's value and ours. Its two systems are evaluate rows that differ
only there: two guidance points of one evaluate run (an inference setting), or the same grid point of two
models trained alike but for that key (a training setting, read from the training runs' logged params). Each
metric's paired difference (paper - default) gets a bootstrap 95% CI on the same prompts and seeds, and
the decision is computed, never typed in: the paper's value unless the CIs favour the default on more
metrics than they favour the paper's (a tie, or no measured difference, keeps the paper's value).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from knn_diffusion.evaluation.claims import NOT_MEASURED, ScoreStore, measure_pair
from knn_diffusion.evaluation.stats import Verdict
from knn_diffusion.evaluation.tables import at_trained_k

# (metric, the sign of a better system's difference)
METRICS = (("r_precision", +1), ("clip_score", +1), ("fid", -1))


@dataclass(frozen=True)
class Choice:
    name: str
    paper: str  # where the paper (or the method it builds on) states its value
    backbone: str
    key: str  # the params key; a training key names the section that trains it
    paper_value: float | str
    default_value: float | str  # what it is measured against: the default before the measurement

    @property
    def at_inference(self) -> bool:
        return self.key.startswith("evaluate.")


CHOICES = [
    Choice("guidance lambda", "Sec. 5 (lambda = 8)", "continuous", "evaluate.continuous.guidance", 8.0, 3.0),
    Choice("auxiliary x0 loss weight", "VQ-Diffusion (Gu et al. 2022), lambda = 5e-4", "discrete",
           "train_discrete.aux_weight", 0.0005, 1.0),
    Choice("timestep sampling", "VQ-Diffusion: importance sampling", "discrete",
           "train_discrete.timestep_sampling", "importance", "uniform"),
]


def _training(params: str, key: str) -> tuple[object, dict]:
    """(the value of ``key`` in a model's logged training params, the rest of them)."""
    rest = json.loads(params or "{}")
    return rest.pop(key, None), rest


def _same_value(logged, value) -> bool:
    try:
        return float(logged) == float(value)
    except (TypeError, ValueError):
        return logged == str(value)


def choice_pair(choice: Choice, runs: pd.DataFrame) -> tuple[pd.Series, pd.Series] | None:
    """(the paper's system, the default's) among one backbone's kNN points at the trained k; latest wins."""
    points = at_trained_k(runs[(runs["kind"] == "grid_point") & (runs["backbone"] == choice.backbone)
                               & (runs["score_quantile"].fillna(0) == 0) & (runs["k"] > 0)])
    points = points.sort_values(["start_time", "run_id"], ascending=False)
    if choice.at_inference:
        for _, run in points.groupby("parent_run_id", sort=False):
            paper, default = (run[run["guidance"] == v] for v in (choice.paper_value, choice.default_value))
            if len(paper) and len(default):
                return paper.iloc[0], default.iloc[0]
        return None
    # Two models trained alike but for ``key``: the paper's value vs the default's.
    trained = [(i, *_training(row["model_params"], choice.key)) for i, row in points.iterrows()]
    for i, value, rest in trained:
        if not _same_value(value, choice.paper_value):
            continue
        a = points.loc[i]
        for j, other, other_rest in trained:
            b = points.loc[j]
            if (_same_value(other, choice.default_value) and other_rest == rest and b["point"] == a["point"]
                    and b["prompts_sha256"] == a["prompts_sha256"]):
                return a, b
    return None


# paper - default judged like a claim that the paper's value is better
BETTER = {Verdict.reproduced.value: "paper's", Verdict.contradicted.value: "default's",
          Verdict.inconclusive.value: "neither (CI holds 0)"}


def decide(verdicts: list[str]) -> str:
    """'paper' or 'default' from the per-metric verdicts of paper - default (better = reproduced)."""
    paper = sum(v == Verdict.reproduced.value for v in verdicts)
    default = sum(v == Verdict.contradicted.value for v in verdicts)
    return "default" if default > paper else "paper"


def choices_table(runs: pd.DataFrame, client, *, resamples: int = 1000, set_resamples: int = 200,
                  choices: list[Choice] = CHOICES) -> pd.DataFrame:
    """One row per choice and metric: paper's value, default's, their difference with a CI, the decision."""
    scores, rows = ScoreStore(client), []
    for choice in choices:
        base = {"choice": choice.name, "paper": choice.paper, "backbone": choice.backbone, "key": choice.key,
                "paper_value": choice.paper_value, "default_value": choice.default_value}
        pair = choice_pair(choice, runs)
        if pair is None:
            rows += [{**base, "metric": metric, "a": np.nan, "b": np.nan, "difference": np.nan, "ci_low": np.nan,
                      "ci_high": np.nan, "verdict": f"{NOT_MEASURED}: not in these runs", "keep": "paper"}
                     for metric, _ in METRICS]
            continue
        a, b = pair
        measured = [{**base, "metric": metric, "a": a[metric], "b": b[metric],
                     **measure_pair(metric, sign, a, b, scores, resamples, set_resamples),
                     "run_a": a["run_id"], "run_b": b["run_id"]} for metric, sign in METRICS]
        keep = decide([row["verdict"] for row in measured])
        rows += [{**row, "keep": keep} for row in measured]
    return pd.DataFrame(rows)


def choices_markdown(table: pd.DataFrame) -> str:
    """The choices as markdown: per metric the paper's value vs the default's, paper - default with its CI."""
    lines = ["| setting | backbone | paper | default | metric | paper's | default's "
             "| paper - default [95% CI] | better | keep |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples(index=False):
        ci = "" if pd.isna(row.ci_low) else f" [{row.ci_low:.4g}, {row.ci_high:.4g}]"
        diff = "-" if pd.isna(row.difference) else f"{row.difference:.4g}{ci}"
        values = ["-" if pd.isna(v) else f"{v:.4g}" for v in (row.a, row.b)]
        lines.append(f"| {row.choice} (`{row.key}`) | {row.backbone} | {row.paper_value} ({row.paper}) | "
                     f"{row.default_value} | {row.metric} | {values[0]} | {values[1]} | {diff} | "
                     f"{BETTER.get(row.verdict, row.verdict)} | **{row.keep}** |")
    return "\n".join(lines)
