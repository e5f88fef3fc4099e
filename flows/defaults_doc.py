"""docs/defaults.md: the paper's explicit settings against today's defaults, measured on the val split.

``python -m flows.sweep --preset defaults`` evaluates them (``make defaults`` runs both); this writes, from
that sweep's MLflow runs, the choices table (``knn_diffusion.evaluation.choices``: each metric's paired
difference with its 95% CI and the computed decision) and every val point with its CIs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.study_doc import provenance, sweep_runs


def write_defaults_doc(repo: Path, prefix: str, out: Path) -> Path:
    from knn_diffusion.evaluation.choices import choices_markdown, choices_table
    from knn_diffusion.evaluation.intervals import interval_columns
    from knn_diffusion.evaluation.metrics import metric_columns
    from knn_diffusion.evaluation.runs import SOURCE_COLUMNS
    from knn_diffusion.evaluation.tables import markdown

    client, parent, trials, runs = sweep_runs(repo, prefix)
    runs = runs[runs["split"] == "val"]
    if runs.empty:
        raise ValueError(f"sweep '{prefix}' has no evaluate run on the val split (evaluate.split=val)")
    choices = choices_table(runs, client)
    command = f"python -m flows.defaults_doc --prefix {prefix}"
    lines = [f"# Defaults: the paper's settings vs ours, on the val split (sweep '{prefix}')", "",
             provenance(parent, trials, command), "",
             "Every setting is measured on the generator dataset's **val** split (never test): each metric's "
             "difference paper - default on the same prompts and seeds, with a paired bootstrap 95% CI. `keep` is "
             "computed: the paper's value unless the CIs favour the default on more metrics than the paper's.", "",
             choices_markdown(choices), "", "## Every val point of the sweep", ""]
    keys = ["pipeline_run", "backbone", "variant", "model_size", "k", "guidance"]
    points = runs[runs["kind"] == "grid_point"].sort_values(keys)
    lines += [markdown(points[[*keys, *metric_columns(), *interval_columns(), *SOURCE_COLUMNS, "dvc_deps"]]), ""]
    out.write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.defaults_doc", description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", default="defaults", help="the sweep's prefix (its preset's name)")
    parser.add_argument("--repo", default=".")
    parser.add_argument("--out", default="docs/defaults.md")
    args = parser.parse_args(argv)
    repo = Path(args.repo).resolve()
    try:
        print(write_defaults_doc(repo, args.prefix, repo / args.out))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
