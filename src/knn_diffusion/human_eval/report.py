"""The human-evaluation table of the ablation report, from the aggregate stages' runs in MLflow.

One row per compared pair of systems (the latest finished aggregate that has answers), in the paper's
layout: the share of pairs won by A per question, with its 95% Wilson interval, and the run it came from.
The generation study (``human_eval_aggregate``) and the edit study (``human_eval_aggregate_manipulation``)
share the table; a question a study does not ask reads "-".
"""

from __future__ import annotations

from knn_diffusion.human_eval.aggregate import HEADLINE, preference_cell


def latest_results(client, experiment_id: str) -> list:
    """The newest finished aggregate run with answers for each (system A, system B)."""
    runs = client.search_runs([experiment_id], filter_string="tags.stage LIKE 'human_eval_aggregate%' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
    latest: dict[tuple[str, str], object] = {}
    for run in runs:
        if any(name.endswith(".pct_prefer_a") for name in run.data.metrics):
            latest.setdefault((run.data.tags.get("system_a", ""), run.data.tags.get("system_b", "")), run)
    return list(latest.values())


def _questions(run) -> list[str]:
    """The questions the run's package asks (its ``questions`` tag; older runs: the generation study's two)."""
    return run.data.tags.get("questions", "quality,alignment").split(",")


def report_section(client, experiment_id: str) -> str:
    """A markdown section for the report; empty when no study has answers yet."""
    runs = latest_results(client, experiment_id)
    if not runs:
        return ""
    asked_by = {run.info.run_id: _questions(run) for run in runs}
    asked = [q for q in HEADLINE if any(q in questions for questions in asked_by.values())]
    lines = ["## Human evaluation", "", "Percentage of pairs in which the majority of raters preferred A; brackets: "
             "95% Wilson score interval (the aggregate stages' runs, the latest per pair of systems).", "",
             "| A | vs. B | " + " | ".join(HEADLINE[q] for q in asked) + " | pairs | run |",
             "|---|---|" + "---|" * len(asked) + "---|---|"]
    for run in runs:
        metrics, tags = run.data.metrics, run.data.tags
        cells = [preference_cell(*(metrics.get(f"{q}.{m}") for m in ("pct_prefer_a", "ci_low", "ci_high")))
                 if q in asked_by[run.info.run_id] else "-" for q in asked]
        pairs = max(int(metrics.get(f"{q}.pairs", 0)) for q in asked)
        lines.append(f"| {tags.get('system_a', '')} | {tags.get('system_b', '')} | " + " | ".join(cells)
                     + f" | {pairs} | {run.info.run_id[:8]} |")
    return "\n".join(lines) + "\n"
