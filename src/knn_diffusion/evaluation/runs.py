"""The evaluate runs of an MLflow store as one table: a row per grid point (and retrieval baseline) with
its settings, metrics and CIs, the model it scored (variant, size) and the run, commit and DVC inputs it
comes from.

A sweep trial whose evaluate outputs DVC restored from its run cache logs no evaluate run; given that
trial's inputs (DVC hashes of its deps, its params), the earlier evaluate run that read the same inputs -
the one that produced those outputs - stands in, named in ``restored_from``.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from knn_diffusion.evaluation.grid import NOT_APPLICABLE
from knn_diffusion.evaluation.intervals import interval_columns
from knn_diffusion.evaluation.metrics import metric_columns
from knn_diffusion.evaluation.score_quantiles import COLUMNS as QUANTILE_COLUMNS

SOURCE_COLUMNS = ("split", "judge", "run_id", "git_commit", "data_version", "restored_from")


class MixedFeaturesError(ValueError):
    """The selected runs computed FID/KID on different feature networks."""


def _number(value: str | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _model_params(client, run_id: str, cache: dict[str, dict]) -> dict[str, str]:
    """The params logged by the run that trained the model (empty when it was trained in another store)."""
    if not run_id:
        return {}
    if run_id not in cache:
        try:
            cache[run_id] = dict(client.get_run(run_id).data.params)
        except Exception:  # trained in another store
            cache[run_id] = {}
    return cache[run_id]


def model_size(model_params: dict[str, str]) -> str:
    """The architecture preset the model was trained with (any ``<section>.preset`` param)."""
    return next((v for k, v in sorted(model_params.items()) if k.endswith(".preset")), "unknown")


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


def _point_row(client, run, pipeline_run: str, restored_from: str, models: dict[str, dict]) -> dict:
    p, tags = run.data.params, run.data.tags
    trained_with = _model_params(client, p.get("model_run_id", ""), models)
    dvc = {k[len("dvc.dep."):]: v for k, v in sorted(tags.items()) if k.startswith("dvc.dep.")}
    return {
        "kind": tags["evaluate.kind"], "point": run.info.run_name, "pipeline_run": pipeline_run,
        "variant": p.get("variant", ""), "model_size": model_size(trained_with), "split": p.get("split", "test"),
        "backbone": p.get("backbone", ""), "trained_k": _number(p.get("trained_k")),
        "k": _number(p.get("k")), "index_fraction": _number(p.get("index_fraction")),
        "guidance": _number(p.get("guidance")), "index": p.get("index", NOT_APPLICABLE),
        "fid_feature": p.get("fid_feature", ""), "score_quantile": _number(p.get("score_quantile")),
        **{m: run.data.metrics.get(m) for m in (*metric_columns(), *interval_columns(), *QUANTILE_COLUMNS)},
        "seeds": _number(p.get("seeds", "1")), "prompts_sha256": p.get("prompts_sha256", ""),
        "parent_run_id": tags.get("mlflow.parentRunId", ""),
        "judge": p.get("judge", ""),  # kind:fingerprint of the encoder that scored (evaluate.judge)
        "run_id": run.info.run_id, "git_commit": tags.get("git.commit", ""),
        "data_version": hashlib.sha256(json.dumps(dvc, sort_keys=True).encode()).hexdigest()[:12] if dvc else "",
        "restored_from": restored_from, "dvc_deps": json.dumps(dvc, sort_keys=True), "start_time": run.info.start_time,
        "model_params": json.dumps(trained_with, sort_keys=True),
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
    models: dict[str, dict] = {}
    rows = [_point_row(client, r, r.data.tags.get("pipeline_run", ""), "", models) for r in points
            if not pipeline_runs or r.data.tags.get("pipeline_run") in set(pipeline_runs)]
    for name, inputs in (restored or {}).items():
        own = {s.info.run_name for s in stages.values() if s.data.tags.get("pipeline_run") == name}
        sources: dict[str, object] = {}
        for stage in sorted(stages.values(), key=lambda r: r.info.start_time):
            if stage.info.run_name not in own and read_same_inputs(stage, inputs):
                sources[stage.info.run_name] = stage  # the latest one per evaluate stage
        for stage in sources.values():
            source = stage.data.tags.get("pipeline_run") or stage.info.run_id
            rows += [_point_row(client, r, name, source, models) for r in points
                     if r.data.tags.get("mlflow.parentRunId") == stage.info.run_id]
    columns = ["kind", "point", "pipeline_run", "variant", "model_size", "backbone", "trained_k", "k",
               "index_fraction", "guidance", "index", "fid_feature", "score_quantile", *metric_columns(),
               *interval_columns(), *QUANTILE_COLUMNS, "seeds", "prompts_sha256", "parent_run_id", *SOURCE_COLUMNS,
               "dvc_deps", "start_time", "model_params"]
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
