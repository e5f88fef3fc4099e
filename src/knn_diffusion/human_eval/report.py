"""The human-evaluation table of the ablation report, from the ``human_eval_aggregate`` runs in MLflow.

One row per compared pair of systems (the latest finished aggregate that has answers), in the paper's
layout: the share of pairs won by A per question, with its 95% Wilson interval, and the run it came from.
"""

from __future__ import annotations

from knn_diffusion.human_eval.aggregate import HEADLINE, preference_cell

STAGE = "human_eval_aggregate"


def latest_results(client, experiment_id: str) -> list:
    """The newest finished aggregate run with answers for each (system A, system B)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.stage = '{STAGE}' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
    latest: dict[tuple[str, str], object] = {}
    for run in runs:
        if any(name.endswith(".pct_prefer_a") for name in run.data.metrics):
            latest.setdefault((run.data.tags.get("system_a", ""), run.data.tags.get("system_b", "")), run)
    return list(latest.values())


def report_section(client, experiment_id: str) -> str:
    """A markdown section for the report; empty when no study has answers yet."""
    runs = latest_results(client, experiment_id)
    if not runs:
        return ""
    lines = ["## Human evaluation", "", "Percentage of pairs in which the majority of raters preferred A; brackets: "
             "95% Wilson score interval (`human_eval_aggregate` runs, the latest per pair of systems).", "",
             "| A | vs. B | " + " | ".join(HEADLINE.values()) + " | pairs | run |",
             "|---|---|" + "---|" * len(HEADLINE) + "---|---|"]
    for run in runs:
        metrics, tags = run.data.metrics, run.data.tags
        cells = [preference_cell(*(metrics.get(f"{q}.{m}") for m in ("pct_prefer_a", "ci_low", "ci_high")))
                 for q in HEADLINE]
        pairs = max(int(metrics.get(f"{q}.pairs", 0)) for q in HEADLINE)
        lines.append(f"| {tags.get('system_a', '')} | {tags.get('system_b', '')} | " + " | ".join(cells)
                     + f" | {pairs} | {run.info.run_id[:8]} |")
    return "\n".join(lines) + "\n"
