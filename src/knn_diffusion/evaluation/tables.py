"""The paper's ablation tables and plots, cut from the evaluate runs (:mod:`knn_diffusion.evaluation.runs`).

Each table is a filter (the other axes at their reference values) and the columns that tell its rows
apart: by k, by index fraction, by guidance, by conditioning variant, by model size, kNN vs no kNN,
model vs retrieval baseline. Each backbone is cut at its own reference settings. Every metric with a
bootstrap CI is shown as ``value [low, high]``; the plots draw the CIs as error bars.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from knn_diffusion.evaluation.grid import BASELINE, NOT_APPLICABLE
from knn_diffusion.evaluation.intervals import CI_METRICS, interval_columns
from knn_diffusion.evaluation.metrics import metric_columns
from knn_diffusion.evaluation.runs import SOURCE_COLUMNS
from knn_diffusion.models.config import ConditioningVariant


@dataclass
class Table:
    name: str
    title: str
    keys: list[str]
    select: Callable[[pd.DataFrame], pd.DataFrame]


def mode(values: pd.Series) -> float | None:
    values = values.dropna()
    return None if values.empty else values.mode().sort_values().iloc[0]


def reference_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Grid points at the reference index and guidance, full index (k=0 points have neither)."""
    points = runs[runs["kind"] == "grid_point"]
    guidance, fraction = mode(points["guidance"]), points["index_fraction"].max()
    own = mode(points.loc[points["index"] != NOT_APPLICABLE, "index"])
    return points[(points["guidance"] == guidance)
                  & ((points["k"] == 0) | ((points["index_fraction"] == fraction) & (points["index"] == own)))]


def at_trained_k(runs: pd.DataFrame) -> pd.DataFrame:
    without_knn = [v.value for v in ConditioningVariant if not v.uses_knn]
    return runs[(runs["k"] == runs["trained_k"]) | (runs["variant"].isin(without_knn) & (runs["k"] == 0))]


def _by_fraction(runs: pd.DataFrame) -> pd.DataFrame:
    """Each model's k that was evaluated at more than one index fraction: a lone point says nothing of index size."""
    points = runs[(runs["kind"] == "grid_point") & (runs["k"] > 0)]
    points = points[(points["guidance"] == mode(points["guidance"])) & (points["index"] == mode(points["index"]))]
    fractions = points.groupby(["variant", "model_size", "k"])["index_fraction"].transform("nunique")
    return points[fractions > 1]


def _by_guidance(runs: pd.DataFrame) -> pd.DataFrame:
    points = at_trained_k(runs[runs["kind"] == "grid_point"])
    full = (points["index_fraction"] == points["index_fraction"].max()) | (points["k"] == 0)
    return points[full & ((points["index"] == mode(points["index"])) | (points["k"] == 0))]


def _knn_vs_none(runs: pd.DataFrame) -> pd.DataFrame:
    reference = reference_points(runs)
    out = pd.concat([reference[reference["k"] == 0], at_trained_k(reference)]).drop_duplicates("run_id")
    return out.assign(knn=(out["k"] > 0).map({True: "kNN (k as trained)", False: "no kNN at inference"}))


def _model_vs_baseline(runs: pd.DataFrame) -> pd.DataFrame:
    model = at_trained_k(reference_points(runs)).assign(system="model")
    baseline = runs[runs["kind"] == BASELINE].assign(system="retrieval baseline (1st neighbour)")
    return pd.concat([model, baseline])


TABLES = [
    Table("by_k", "By k (neighbours at inference; 0 = no kNN)", ["variant", "model_size", "k"], reference_points),
    Table("by_index_fraction", "By index fraction at inference", ["variant", "model_size", "k", "index_fraction"],
          _by_fraction),
    Table("by_guidance", "By guidance scale", ["variant", "model_size", "guidance"], _by_guidance),
    Table("by_variant", "By conditioning variant (trained k, full index)", ["variant", "model_size"],
          lambda r: at_trained_k(reference_points(r))),
    Table("by_model_size", "By model size, with and without kNN", ["model_size", "variant"],
          lambda r: at_trained_k(reference_points(r))),
    Table("knn_vs_no_knn", "kNN vs no kNN", ["variant", "model_size", "knn"], _knn_vs_none),
    Table("model_vs_baseline", "Model vs retrieval baseline", ["system", "variant", "model_size"], _model_vs_baseline),
]


def build_tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Table name -> rows (latest run per cell), sorted, with metrics and the run each row comes from."""
    tables = {}
    for table in TABLES:
        # Each backbone at its own reference settings (their guidance scales differ), never in one cell.
        picked = pd.concat([table.select(group) for _, group in runs.groupby("backbone", sort=True)] or [runs])
        if picked.empty:
            continue
        keys = ["backbone", *table.keys]
        latest = picked.sort_values(["start_time", "run_id"]).groupby(keys, dropna=False).tail(1)
        ordered = latest.sort_values(keys, kind="stable")
        tables[table.name] = ordered[[*keys, *metric_columns(), *interval_columns(), *SOURCE_COLUMNS, "pipeline_run",
                                      "dvc_deps"]].reset_index(drop=True)
    return tables


def with_intervals(frame: pd.DataFrame) -> pd.DataFrame:
    """Each metric with a CI as one text cell ``value [low, high]`` (runs logged before CIs: the value alone)."""
    shown = frame.copy()
    for metric in CI_METRICS:
        low, high = f"{metric}_ci_low", f"{metric}_ci_high"
        if metric not in shown or low not in shown:
            continue
        shown[metric] = [interval_cell(v, lo, hi) for v, lo, hi in zip(shown[metric], shown[low], shown[high])]
        shown = shown.drop(columns=[low, high])
    return shown


def interval_cell(value, low, high) -> str:
    """``value [low, high]``; the value alone without a CI; empty for a run that did not log the metric."""
    if pd.isna(value):
        return ""
    return f"{value:.4g}" if pd.isna(low) else f"{value:.4g} [{low:.4g}, {high:.4g}]"


def markdown(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    shown = with_intervals(frame.drop(columns=["dvc_deps"])).assign(run_id=frame["run_id"].str[:8],
                                                                    git_commit=frame["git_commit"].str[:8])
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def plot_tables(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    """The paper's Fig. 9/10-style curves - FID and R-precision vs k, vs index fraction, vs model size (with
    and without kNN) - each point with its 95% CI as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [("by_k", "k", ["backbone", "variant", "model_size"], "fid_vs_k.png"),
             ("by_index_fraction", "index_fraction", ["backbone", "variant", "model_size", "k"],
              "fid_vs_index_fraction.png"),
             ("by_model_size", "model_size", ["backbone", "variant"], "fid_vs_model_size.png")]
    written = []
    for name, axis, lines, file in specs:
        if name not in tables:
            continue
        figure, panels = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
        for ax, metric, label in zip(panels, ("fid", "r_precision"), ("FID", "R-precision (judge)")):
            for key, group in tables[name].groupby(lines, sort=True):
                x = group[axis].astype(str) if axis == "model_size" else group[axis]
                ax.errorbar(x, group[metric], yerr=error_bars(group, metric), marker="o", capsize=3,
                            label=" / ".join(str(v) for v in (key if isinstance(key, tuple) else (key,))))
            ax.set_xlabel(axis.replace("_", " "))
            ax.set_ylabel(f"{label}, 95% CI")
            ax.grid(alpha=0.3)
        panels[0].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out_dir / file, metadata={"Software": None})
        plt.close(figure)
        written.append(out_dir / file)
    return written


def error_bars(group: pd.DataFrame, metric: str):
    """(2, n) distances from each value to its CI bounds, or None when the runs carry no CI."""
    low, high = group.get(f"{metric}_ci_low"), group.get(f"{metric}_ci_high")
    if low is None or low.isna().any():
        return None
    return [(group[metric] - low).clip(lower=0).to_numpy(), (high - group[metric]).clip(lower=0).to_numpy()]
