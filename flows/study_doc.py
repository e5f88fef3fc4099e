"""docs/study.md, generated from a study sweep's MLflow runs: ``python -m flows.study_doc --prefix study``.

The latest sweep parent run of that prefix names the trials. Their evaluate runs give the claims table, the
ablation tables with 95% CIs and the plots with error bars (``knn_diffusion.evaluation.report``), written
beside the document (``docs/study/``). Each evaluate run's grid image (prompts x settings) is a sample grid.
The human-evaluation package of the kNN model vs the trained no-kNN model (the paper's Tab. 1 comparison,
one per backbone) is built from the two evaluate point folders, read out of their DVC experiments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
from pathlib import Path

from flows.dvc_cli import dvc, dvc_experiments, stage_env
from flows.sweep_tracking import sweep_tracking_uri
from knn_diffusion.config import flatten, load_params
from knn_diffusion.tracking import quiet_artifact_downloads


def latest_study(client, experiment_id: str, prefix: str):
    """The newest sweep parent run of ``prefix`` and {trial name: trial run}."""
    sweeps = client.search_runs([experiment_id], f"tags.kind = 'sweep' and tags.`sweep.prefix` = '{prefix}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        raise ValueError(f"no sweep with prefix '{prefix}' in this MLflow store: run `python -m flows.sweep "
                         f"--preset {prefix}` first")
    trials = client.search_runs([experiment_id], f"tags.kind = 'trial' and tags.`mlflow.parentRunId` = "
                                f"'{sweeps[0].info.run_id}'", max_results=10_000)
    return sweeps[0], {t.data.tags.get("dvc.experiment", t.info.run_name): t for t in trials}


def sample_grids(client, runs, folder: Path) -> list[tuple[str, Path]]:
    """Each evaluate run's prompts x settings grid, downloaded into ``folder``: [(caption, file)]."""
    grids = []
    for (trial, backbone, stage_run), group in runs.groupby(["pipeline_run", "backbone", "parent_run_id"], sort=True):
        try:
            path = Path(client.download_artifacts(stage_run, "evaluate/grid.png", str(folder / stage_run)))
        except Exception:  # a run without its grid (logged elsewhere): no sample for it
            continue
        target = folder / f"{trial}-{backbone}.png"
        shutil.move(path, target)
        shutil.rmtree(folder / stage_run, ignore_errors=True)
        columns = ", ".join(sorted(set(group["point"])))
        grids.append((f"{trial}, {backbone}: {columns}", target))
    return grids


def export_point(repo: Path, env: dict[str, str], trial: str, backbone: str, point: str, target: Path) -> Path:
    """An evaluate point folder of a DVC experiment (its committed outputs), copied to ``target``."""
    from dvc.api import DVCFileSystem

    shown = json.loads(dvc(repo, env, "exp", "show", "--json").stdout or "[]")
    revs = [exp["revs"][0]["rev"] for entry in shown for exp in entry.get("experiments") or []
            if exp.get("name") == trial]
    if not revs:
        raise ValueError(f"DVC knows no experiment '{trial}' in {repo}")
    shutil.rmtree(target, ignore_errors=True)
    DVCFileSystem(str(repo), rev=revs[0]).get(f"outputs/evaluate/{backbone}/{point}", str(target), recursive=True)
    return target


def human_eval_packages(repo: Path, runs, out: Path, seed: int = 0) -> list[str]:
    """Per backbone, the human-evaluation package of the kNN model vs the no-kNN model (largest size, same
    prompts and seeds): a markdown line per package."""
    from knn_diffusion.evaluation.claims import knn_vs_no_knn_model
    from knn_diffusion.human_eval.package import make_pairs, read_system, write_package

    env, lines = stage_env(), []
    for backbone, group in runs.groupby("backbone", sort=True):
        pairs = knn_vs_no_knn_model(group)
        if not pairs:
            lines.append(f"- {backbone}: no kNN / no-kNN pair among the study's runs")
            continue
        label, a, b = pairs[-1]
        folders = [export_point(repo, env, row["pipeline_run"], backbone, row["point"],
                                out / backbone / f"{side}-{row['variant']}") for side, row in (("a", a), ("b", b))]
        system_a, system_b = read_system(folders[0]), read_system(folders[1])
        matched = make_pairs(system_a, system_b, 100_000, seed)  # as many pairs as the prompts allow
        key = write_package(matched, out / backbone / "package", out / backbone / "key.json", a=system_a, b=system_b,
                            name_a=f"kNN ({a['variant']})", name_b="no kNN", questions=["quality", "alignment"],
                            raters=5, base_url="", seed=seed)
        shown = out.relative_to(repo) if out.is_relative_to(repo) else out  # the doc is committed: no home paths
        lines.append(f"- {backbone} ({label}): {len(matched)} pairs, package `{shown / backbone / 'package'}` "
                     f"(id {key['package_id']}; the key apart in `{shown / backbone / 'key.json'}`)")
    return lines


def sweep_runs(repo: Path, prefix: str):
    """(MLflow client, the latest sweep parent run of ``prefix``, its trials, their evaluate rows)."""
    from mlflow import MlflowClient

    from knn_diffusion.evaluation.runs import evaluate_runs

    uri = sweep_tracking_uri(repo)
    client = MlflowClient(uri)
    experiment = load_params(repo / "params.yaml").tracking.experiment
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parent, trials = latest_study(client, experiment_id, prefix)
    env = {**stage_env(), "MLFLOW_TRACKING_URI": uri}
    inputs = {name: {"deps": info.get("deps", {}), "params": flatten(info.get("params", {}))}
              for name, info in dvc_experiments(repo, env).items() if name in trials}
    return client, parent, trials, evaluate_runs(client, experiment, sorted(trials), inputs)


def provenance(parent, trials, command: str) -> str:
    """Which sweep run a generated document comes from, and how to regenerate it."""
    hours = ((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 3.6e6
    started = datetime.datetime.fromtimestamp(parent.info.start_time / 1000, datetime.UTC)
    return (f"Generated by `{command}` from MLflow sweep run `{parent.info.run_id}` ({parent.info.status}; "
            f"started {started:%Y-%m-%d %H:%M} UTC, {hours:.2f} h from its first start to its last end; "
            f"{len(trials)} trials: {', '.join(sorted(trials))}). Do not edit by hand: rerun the command.")


def write_study_doc(repo: Path, prefix: str, out: Path, packages: Path) -> Path:
    """docs/study.md (``out``) and its figures and tables (``out``'s stem folder beside it)."""
    from knn_diffusion.evaluation.report import write_report

    client, parent, trials, runs = sweep_runs(repo, prefix)
    folder = out.with_suffix("")
    shutil.rmtree(folder, ignore_errors=True)
    write_report(runs, folder, title=f"Reproduction study: sweep '{prefix}'", client=client)
    report = re.sub(r"!\[\]\(([^)]+)\)", lambda m: f"![]({folder.name}/{m.group(1)})",
                    (folder / "tables.md").read_text())
    grids = sample_grids(client, runs, folder / "grids")
    lines = [report.replace(f"# Reproduction study: sweep '{prefix}'", f"# Reproduction study: sweep '{prefix}'\n\n"
                            + provenance(parent, trials, f"python -m flows.study_doc --prefix {prefix}"), 1),
             "", "## Sample grids (test prompts down, settings across)", ""]
    lines += [f"{caption}\n\n![]({path.relative_to(out.parent)})\n" for caption, path in grids]
    lines += ["## Human evaluation: the kNN model vs the trained no-kNN model", "",
              "Packages for raters (the `human_eval` stage's format: task pages and MTurk batch files), as many "
              "pairs as the test prompts and seeds allow; aggregate the answers with `human_eval_aggregate`.", "",
              *human_eval_packages(repo, runs, packages), ""]
    out.write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.study_doc", description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", default="study", help="the study sweep's prefix (its preset's name)")
    parser.add_argument("--repo", default=".")
    parser.add_argument("--out", default="docs/study.md")
    parser.add_argument("--packages", default="outputs/study/human_eval", help="where the human-eval packages go")
    args = parser.parse_args(argv)
    repo = Path(args.repo).resolve()
    quiet_artifact_downloads()
    try:
        print(write_study_doc(repo, args.prefix, repo / args.out, repo / args.packages))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
