"""The ablation report, regenerated from the evaluate runs in an MLflow store: the claims table first
(:mod:`knn_diffusion.evaluation.claims`), then the paper's ablation tables with 95% CIs and the plots
with error bars (:mod:`knn_diffusion.evaluation.tables`), from the runs selected by
:mod:`knn_diffusion.evaluation.runs`. Every row names the run, git commit and DVC input hashes it comes
from; FID/KID values of different feature networks are never put in one column.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from knn_diffusion.evaluation.claims import claims_markdown, claims_table
from knn_diffusion.evaluation.runs import evaluate_runs, single_feature
from knn_diffusion.evaluation.score_quantiles import COLUMNS as QUANTILE_COLUMNS
from knn_diffusion.evaluation.score_quantiles import plot_score_quantiles
from knn_diffusion.evaluation.tables import TABLES, build_tables, markdown, plot_tables

SPLITS_NOTE = ("Every number is measured on the test split (its captions are the prompts, its images the FID/KID "
               "reference). Settings are chosen on the val split, never on test: no number in this report feeds "
               "back into params.yaml.")


def write_report(runs: pd.DataFrame, out_dir: str | os.PathLike, *, title: str, feature: str | None = None,
                 appendix: str = "", notes: list[str] = (), client=None) -> list[Path]:
    """tables.md (the claims table, then ``notes``, the ablation tables and plots, and ``appendix``, e.g. the
    human evaluation) + one CSV per table (and ``claims.csv``) + PNG plots into ``out_dir``; returns the
    files written. ``client``: the MLflow client whose runs hold the per-image values the claims pair (without
    it every claim reads "not measured")."""
    runs, feature = single_feature(runs, feature)
    tables = build_tables(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    claims = claims_table(runs, client)
    claims.to_csv(out_dir / "claims.csv", index=False, float_format="%.6f")
    written = [out_dir / "claims.csv"]
    sections = [f"# {title}", "", "## Claims of the paper", "",
                "Each claim is a difference a - b between two systems scored on the same test prompts and seeds, "
                "with a paired bootstrap 95% CI over prompts; the verdict is read off the CI: `reproduced` when it "
                "lies wholly on the side the paper predicts, `contradicted` when wholly on the other, "
                "`inconclusive` when it contains 0.", "", claims_markdown(claims), "", f"> {SPLITS_NOTE}", "",
                f"FID/KID features: `{feature}` (every table; values of other features are "
                "not comparable). Metrics read `value [95% CI]` (bootstrap over prompts, a prompt's seeds together; "
                "FID and KID refitted on each resample of the images). Each row names its MLflow run, git commit "
                "and data version (a hash of the DVC input hashes of the evaluate stage, listed per run in the "
                "CSV's `dvc_deps`).", "",
                *(f"> {note}\n" for note in notes)]
    by_name = {t.name: t for t in TABLES}
    for name, frame in tables.items():
        sections += [f"## {by_name[name].title}", "", markdown(frame), ""]
        path = out_dir / f"{name}.csv"
        frame.to_csv(path, index=False, float_format="%.6f")
        written.append(path)
    plots = plot_tables(tables, out_dir)
    sections += ["## Plots (95% CIs as error bars)", "", *(f"![]({p.name})" for p in plots), ""] if plots else []
    quantiles = runs[runs["score_quantile"].fillna(0) > 0].dropna(subset=QUANTILE_COLUMNS)
    if len(quantiles):  # the paper's Fig. 8
        labels = quantiles[["pipeline_run", "backbone", "k", "index_fraction", "guidance", "index"]].astype(str)
        written.append(plot_score_quantiles(quantiles.assign(label=labels.agg(" ".join, axis=1)),
                                            out_dir / "score_quantiles.png"))
        sections += ["## Per-query score quantiles (Fig. 8)", "", "![](score_quantiles.png)", ""]
    (out_dir / "tables.md").write_text("\n".join(sections + [appendix] if appendix else sections))
    written.append(out_dir / "tables.md")
    return written + plots


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
                         appendix=report_section(client, experiment_id), notes=notes, client=client)
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
