"""The paper's ablation tables and plots, regenerated from the evaluate runs in an MLflow store.

Every evaluate grid point (and retrieval baseline) is an MLflow child run with its settings as params
and FID/KID/CLIP score/R-precision as metrics. This module selects those runs (one experiment, some
pipeline runs or sweep experiments), joins each to the training run of its model (model size), and
cuts paper-style tables: by k, by index fraction, by guidance, by conditioning variant, by model size,
kNN vs no kNN, model vs retrieval baseline; and Fig. 8 from score-quantile points. Every row names
the run, git commit and DVC input hashes it comes from. FID/KID values of different feature networks
are never put in one column.

A sweep trial whose evaluate outputs DVC restored from its run cache logs no evaluate run; given that
trial's inputs (DVC hashes of its deps, its params), the report takes the earlier evaluate run that read
the same inputs - the one that produced those outputs - and names it in ``restored_from``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from knn_diffusion.evaluation.grid import BASELINE, NOT_APPLICABLE
from knn_diffusion.evaluation.metrics import metric_columns
from knn_diffusion.evaluation.score_quantiles import COLUMNS as QUANTILE_COLUMNS
from knn_diffusion.evaluation.score_quantiles import plot_score_quantiles
from knn_diffusion.models.config import ConditioningVariant

SOURCE_COLUMNS = ("judge", "run_id", "git_commit", "data_version", "restored_from")


class MixedFeaturesError(ValueError):
    """The selected runs computed FID/KID on different feature networks."""


def _number(value: str | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _model_size(client, run_id: str, cache: dict[str, str]) -> str:
    """The architecture preset of the run that trained the model (any ``<section>.preset`` param)."""
    if not run_id:
        return "unknown"
    if run_id not in cache:
        try:
            params = client.get_run(run_id).data.params
        except Exception:  # trained in another store
            params = {}
        cache[run_id] = next((v for k, v in sorted(params.items()) if k.endswith(".preset")), "unknown")
    return cache[run_id]


def _same_value(logged: str, value) -> bool:
    """An MLflow param (a string, cut at 6,000 characters) against a params.yaml value: equal as text, or as YAML."""
    import yaml

    if logged == str(value)[:6000]:
        return True
    try:
        return yaml.safe_load(logged) == value
    except yaml.YAMLError:
        return False


def read_same_inputs(run, inputs: dict) -> bool:
    """Whether an evaluate stage run read what ``inputs`` describe: {"deps": {path: DVC hash}, "params":
    {flattened params.yaml key: value}} of a DVC experiment. Every ``dvc.dep.*`` hash of the run must
    match; every param the run logged must equal the experiment's (keys absent there are defaults)."""
    deps = {k[len("dvc.dep."):]: v for k, v in run.data.tags.items() if k.startswith("dvc.dep.")}
    if not deps or any(inputs.get("deps", {}).get(path) != md5 for path, md5 in deps.items()):
        return False
    params = inputs.get("params", {})
    return all(_same_value(value, params[key]) for key, value in run.data.params.items() if key in params)


def _point_row(client, run, pipeline_run: str, restored_from: str, sizes: dict[str, str]) -> dict:
    p, tags = run.data.params, run.data.tags
    dvc = {k[len("dvc.dep."):]: v for k, v in sorted(tags.items()) if k.startswith("dvc.dep.")}
    return {
        "kind": tags["evaluate.kind"], "point": run.info.run_name, "pipeline_run": pipeline_run,
        "variant": p.get("variant", ""), "model_size": _model_size(client, p.get("model_run_id", ""), sizes),
        "backbone": p.get("backbone", ""), "trained_k": _number(p.get("trained_k")),
        "k": _number(p.get("k")), "index_fraction": _number(p.get("index_fraction")),
        "guidance": _number(p.get("guidance")), "index": p.get("index", NOT_APPLICABLE),
        "fid_feature": p.get("fid_feature", ""), "score_quantile": _number(p.get("score_quantile")),
        **{m: run.data.metrics.get(m) for m in (*metric_columns(), *QUANTILE_COLUMNS)},
        "judge": p.get("judge", ""),  # kind:fingerprint of the encoder that scored (evaluate.judge)
        "run_id": run.info.run_id, "git_commit": tags.get("git.commit", ""),
        "data_version": hashlib.sha256(json.dumps(dvc, sort_keys=True).encode()).hexdigest()[:12] if dvc else "",
        "restored_from": restored_from, "dvc_deps": json.dumps(dvc, sort_keys=True), "start_time": run.info.start_time,
    }


def evaluate_runs(client, experiment: str, pipeline_runs: list[str] | None = None,
                  restored: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per evaluate child run of ``experiment`` (optionally of some ``pipeline_run`` tags).

    ``restored``: {pipeline run: its DVC inputs (see :func:`read_same_inputs`)}; an evaluate stage (by run
    name: ``evaluate``, ``evaluate@discrete``) that such a pipeline run did not log itself gets the points
    of the latest earlier run of it with the same inputs, ``restored_from`` naming that run's pipeline run.
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"MLflow experiment '{experiment}' not found")
    logged = [r for r in client.search_runs([found.experiment_id], "tags.stage = 'evaluate'", max_results=50_000)
              if r.info.status == "FINISHED"]
    points = [r for r in logged if "evaluate.kind" in r.data.tags]
    stages = {r.info.run_id: r for r in logged if "evaluate.kind" not in r.data.tags}
    sizes: dict[str, str] = {}
    rows = [_point_row(client, r, r.data.tags.get("pipeline_run", ""), "", sizes) for r in points
            if not pipeline_runs or r.data.tags.get("pipeline_run") in set(pipeline_runs)]
    for name, inputs in (restored or {}).items():
        own = {s.info.run_name for s in stages.values() if s.data.tags.get("pipeline_run") == name}
        sources: dict[str, object] = {}
        for stage in sorted(stages.values(), key=lambda r: r.info.start_time):
            if stage.info.run_name not in own and read_same_inputs(stage, inputs):
                sources[stage.info.run_name] = stage  # the latest one per evaluate stage
        for stage in sources.values():
            source = stage.data.tags.get("pipeline_run") or stage.info.run_id
            rows += [_point_row(client, r, name, source, sizes) for r in points
                     if r.data.tags.get("mlflow.parentRunId") == stage.info.run_id]
    columns = ["kind", "point", "pipeline_run", "variant", "model_size", "backbone", "trained_k", "k",
               "index_fraction", "guidance", "index", "fid_feature", "score_quantile", *metric_columns(),
               *QUANTILE_COLUMNS, *SOURCE_COLUMNS, "dvc_deps", "start_time"]
    return pd.DataFrame(rows, columns=columns)


def single_feature(runs: pd.DataFrame, feature: str | None = None) -> tuple[pd.DataFrame, str]:
    """The runs of one FID feature network: ``feature``, or the only one present (else refused)."""
    present = sorted(set(runs["fid_feature"]))
    if feature is not None:
        if feature not in present:
            raise ValueError(f"--feature {feature!r}: no evaluate run used it (present: {present})")
        return runs[runs["fid_feature"] == feature], feature
    if len(present) > 1:
        raise MixedFeaturesError(f"the selected runs computed FID/KID on {len(present)} feature networks {present}; "
                                 "values of different features cannot share a column: pick one with --feature")
    if not present:
        raise ValueError("no evaluate runs selected (run the evaluate stage, or check --experiment/--pipeline-run)")
    return runs, present[0]


# ------------------------------------------------------------------------------------------------
# Tables: each a filter (the other axes at their reference values) and the columns that tell rows apart


@dataclass
class Table:
    name: str
    title: str
    keys: list[str]
    select: Callable[[pd.DataFrame], pd.DataFrame]


def _mode(values: pd.Series) -> float | None:
    values = values.dropna()
    return None if values.empty else values.mode().sort_values().iloc[0]


def _reference(runs: pd.DataFrame) -> pd.DataFrame:
    """Grid points at the reference index and guidance, full index (k=0 points have neither)."""
    points = runs[runs["kind"] == "grid_point"]
    guidance, fraction = _mode(points["guidance"]), points["index_fraction"].max()
    own = _mode(points.loc[points["index"] != NOT_APPLICABLE, "index"])
    return points[(points["guidance"] == guidance)
                  & ((points["k"] == 0) | ((points["index_fraction"] == fraction) & (points["index"] == own)))]


def _at_trained_k(runs: pd.DataFrame) -> pd.DataFrame:
    without_knn = [v.value for v in ConditioningVariant if not v.uses_knn]
    return runs[(runs["k"] == runs["trained_k"]) | (runs["variant"].isin(without_knn) & (runs["k"] == 0))]


def _by_fraction(runs: pd.DataFrame) -> pd.DataFrame:
    points = runs[(runs["kind"] == "grid_point") & (runs["k"] > 0)]
    return points[(points["guidance"] == _mode(points["guidance"])) & (points["index"] == _mode(points["index"]))]


def _by_guidance(runs: pd.DataFrame) -> pd.DataFrame:
    points = _at_trained_k(runs[runs["kind"] == "grid_point"])
    full = (points["index_fraction"] == points["index_fraction"].max()) | (points["k"] == 0)
    return points[full & ((points["index"] == _mode(points["index"])) | (points["k"] == 0))]


def _knn_vs_none(runs: pd.DataFrame) -> pd.DataFrame:
    reference = _reference(runs)
    out = pd.concat([reference[reference["k"] == 0], _at_trained_k(reference)]).drop_duplicates("run_id")
    return out.assign(knn=(out["k"] > 0).map({True: "kNN (k as trained)", False: "no kNN at inference"}))


def _model_vs_baseline(runs: pd.DataFrame) -> pd.DataFrame:
    model = _at_trained_k(_reference(runs)).assign(system="model")
    baseline = runs[runs["kind"] == BASELINE].assign(system="retrieval baseline (1st neighbour)")
    return pd.concat([model, baseline])


TABLES = [
    Table("by_k", "By k (neighbours at inference; 0 = no kNN)", ["variant", "model_size", "k"], _reference),
    Table("by_index_fraction", "By index fraction at inference", ["variant", "model_size", "k", "index_fraction"],
          _by_fraction),
    Table("by_guidance", "By guidance scale", ["variant", "model_size", "guidance"], _by_guidance),
    Table("by_variant", "By conditioning variant (trained k, full index)", ["variant", "model_size"],
          lambda r: _at_trained_k(_reference(r))),
    Table("by_model_size", "By model size, with and without kNN", ["model_size", "variant"],
          lambda r: _at_trained_k(_reference(r))),
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
        tables[table.name] = ordered[[*keys, *metric_columns(), *SOURCE_COLUMNS, "pipeline_run", "dvc_deps"]] \
            .reset_index(drop=True)
    return tables


def _markdown(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    shown = frame.drop(columns=["dvc_deps"]).assign(run_id=frame["run_id"].str[:8],
                                                    git_commit=frame["git_commit"].str[:8])
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def write_report(runs: pd.DataFrame, out_dir: str | os.PathLike, *, title: str, feature: str | None = None,
                 appendix: str = "", notes: list[str] = ()) -> list[Path]:
    """tables.md (``notes`` under the title; + ``appendix``, e.g. the human evaluation) + one CSV per
    table + PNG plots into ``out_dir``; returns the files written."""
    runs, feature = single_feature(runs, feature)
    tables = build_tables(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    sections = [f"# {title}", "", f"FID/KID features: `{feature}` (every table; values of other features are "
                "not comparable). Each row names its MLflow run, git commit and data version (a hash of the DVC "
                "input hashes of the evaluate stage, listed per run in the CSV's `dvc_deps`).", "",
                *(f"> {note}\n" for note in notes)]
    by_name = {t.name: t for t in TABLES}
    for name, frame in tables.items():
        sections += [f"## {by_name[name].title}", "", _markdown(frame), ""]
        path = out_dir / f"{name}.csv"
        frame.to_csv(path, index=False, float_format="%.6f")
        written.append(path)
    quantiles = runs[runs["score_quantile"].fillna(0) > 0].dropna(subset=QUANTILE_COLUMNS)
    if len(quantiles):  # the paper's Fig. 8
        labels = quantiles[["pipeline_run", "backbone", "k", "index_fraction", "guidance", "index"]].astype(str)
        written.append(plot_score_quantiles(quantiles.assign(label=labels.agg(" ".join, axis=1)),
                                            out_dir / "score_quantiles.png"))
        sections += ["## Per-query score quantiles (Fig. 8)", "", "![](score_quantiles.png)", ""]
    (out_dir / "tables.md").write_text("\n".join(sections + [appendix] if appendix else sections))
    written.append(out_dir / "tables.md")
    return written + plot_tables(tables, out_dir)


def plot_tables(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    """The paper's Fig. 9/10-style curves: FID vs k, vs index fraction, vs model size (with/without kNN)."""
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
        figure, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        for label, group in tables[name].groupby(lines, sort=True):
            label = " / ".join(str(v) for v in (label if isinstance(label, tuple) else (label,)))
            ax.plot(group[axis].astype(str) if axis == "model_size" else group[axis], group["fid"], marker="o",
                    label=label)
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out_dir / file, metadata={"Software": None})
        plt.close(figure)
        written.append(out_dir / file)
    return written


def publish_report(experiment: str, out_dir: str | os.PathLike, *, pipeline_runs: list[str] | None = None,
                   feature: str | None = None, tracking_uri: str | None = None, run_id: str | None = None,
                   restored: dict[str, dict] | None = None) -> tuple[str, list[Path]]:
    """Write the report for ``experiment`` (optionally some pipeline runs / sweep experiments) and log it
    to the run ``run_id`` (e.g. a sweep's parent), else to a new ``report`` run; returns (run id, files).
    ``restored``: the DVC inputs of pipeline runs whose evaluation may have come from DVC's run cache
    (see :func:`evaluate_runs`).

    Uses ``MlflowClient`` only (no active run), so a threaded flow can call it.
    """
    from mlflow import MlflowClient

    from knn_diffusion.human_eval.report import report_section
    from knn_diffusion.tracking import git_commit, repo_root, with_retries

    client = MlflowClient(tracking_uri)
    runs = evaluate_runs(client, experiment, pipeline_runs, restored)
    scope = ", ".join(pipeline_runs) if pipeline_runs else "all runs"
    missing = sorted(set(pipeline_runs or ()) - set(runs["pipeline_run"]))
    notes = [f"No evaluate run logged by {', '.join(missing)}: its evaluate stage did not run (DVC restored it "
             "from the run cache, or it failed), and no earlier evaluate run read the same inputs."
             ] if missing else []
    reused = runs[runs["restored_from"] != ""].drop_duplicates(["pipeline_run", "restored_from"])
    notes += [f"{row.pipeline_run}: DVC restored its evaluation from the run cache; its rows are those of the "
              f"identical earlier evaluation by {row.restored_from} (column restored_from)."
              for row in reused.itertuples()]
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    files = write_report(runs, out_dir, title=f"Ablations: experiment '{experiment}' ({scope})", feature=feature,
                         appendix=report_section(client, experiment_id), notes=notes)
    created = run_id is None
    if created:
        tags = {"stage": "report", "git.commit": git_commit(repo_root())[0], "report.pipeline_runs": scope,
                "report.evaluate_runs": str(len(runs))}
        run_id = with_retries(lambda: client.create_run(experiment_id, run_name="report", tags=tags)).info.run_id
    for path in files:
        with_retries(lambda path=path: client.log_artifact(run_id, str(path), "report"))
    if created:
        with_retries(lambda: client.set_terminated(run_id, "FINISHED"))
    return run_id, files
