"""DVC stage ``human_eval_aggregate``: raters' answers (``human_eval_aggregate.results_dir``) -> the table.

Writes ``outputs/human_eval/results.md`` (the paper's layout) and ``metrics/human_eval_aggregate.json``,
logs the numbers on this stage's MLflow run and on the run that made system A (metrics named after B,
tagged with the package), when that run is in the store.

Before any answers exist (the usual state right after packaging) the results folder holds no CSV: the
stage says so, writes a table reading "no answers yet" and empty metrics, and succeeds, so the pipeline
stays green until the answers come back. Validation problems stop it (``error: ...``, exit 2) unless
``strict`` is false.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from knn_diffusion.config import Params
from knn_diffusion.human_eval.aggregate import Report, ResultsError, aggregate, markdown_table
from knn_diffusion.io import read_json, write_json, write_text
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked
from knn_diffusion.tracking import with_retries

log = logging.getLogger(__name__)


def log_on_system_a(key: dict, report: Report, table: str, aggregate_run_id: str) -> bool:
    """Add the results (metrics, tags, the markdown table) to the MLflow run that made system A; False when
    that run is not in this store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_id, baseline = key["system_a"].get("model_run_id"), key["system_b"]["name"]
    if not run_id:
        return False
    client = MlflowClient()
    try:
        tags = client.get_run(run_id).data.tags
    except MlflowException:
        log.warning("system A's run %s is not in this MLflow store: results logged on this stage's run only", run_id)
        return False
    prefix = f"human_eval.{baseline}"
    for name, value in report.metrics().items():
        with_retries(lambda name=name, value=value: client.log_metric(run_id, f"{prefix}.{name}", value))
    for tag, value in {"package_id": key["package_id"], "aggregate_run": aggregate_run_id}.items():
        with_retries(lambda tag=tag, value=value: client.set_tag(run_id, f"{prefix}.{tag}", value))
    baselines = ",".join(sorted({*filter(None, tags.get("human_eval.baselines", "").split(",")), baseline}))
    with_retries(lambda: client.set_tag(run_id, "human_eval.baselines", baselines))
    with_retries(lambda: client.log_text(run_id, table, f"human_eval/vs_{baseline}.md"))
    return True


@dataclass(frozen=True)
class ResultFiles:
    """What one study's aggregation reads (the packaging stage's key) and writes."""

    key: Path
    table: Path
    metrics: Path


GENERATION_RESULTS = ResultFiles(paths.HUMAN_EVAL_KEY, paths.HUMAN_EVAL_TABLE, paths.HUMAN_EVAL_AGGREGATE_METRICS)


def aggregate_study(params: Params, stage: str = "human_eval_aggregate",
                    files: ResultFiles = GENERATION_RESULTS) -> Report | None:
    """Aggregate the answers in params section ``stage``'s ``results_dir`` against ``files.key``."""
    cfg = getattr(params, stage)
    key = read_json(files.key)
    results_dir = Path(cfg.results_dir)
    with tracked(stage, params, stage) as run:
        if not key.get("package_id"):  # the packaging stage made no package this run (its systems were not produced)
            log.info("no human-evaluation package (missing %s): nothing to aggregate", key.get("missing"))
            write_text(files.table, f"No human-evaluation package: {key.get('missing')} not produced.\n")
            write_json(files.metrics, {})
            return None
        run.tags({"package_id": key["package_id"], "questions": ",".join(key["questions"]),
                  "system_a": key["system_a"]["name"],
                  "system_b": key["system_b"]["name"], "system_a.run_id": key["system_a"].get("model_run_id", "")})
        report = aggregate(results_dir, key, strict=cfg.strict)
        table = markdown_table(report, key)
        metrics = report.metrics()
        write_text(files.table, table)
        write_json(files.metrics, metrics)
        run.text(table, f"human_eval/{files.table.name}")
        if not report.files:
            log.info("no result files (*.csv) in %s yet: nothing to aggregate, no metrics logged. Put the "
                     "raters' CSV files there and rerun", results_dir)
            return report
        run.metrics(metrics)
        logged = log_on_system_a(key, report, table, run.id)
        log.info("%d result file(s) aggregated%s:\n%s", len(report.files),
                 f"; also logged on system A's run {key['system_a']['model_run_id']}" if logged else "", table)
    return report


def main(argv: list[str] | None = None) -> None:
    run_stage("human_eval_aggregate", aggregate_study, argv, user_errors=(FileNotFoundError, ResultsError))


if __name__ == "__main__":
    main()
