"""The stage DAG, read from dvc.yaml so the flow never keeps a second list of stages."""

from __future__ import annotations

import graphlib
from pathlib import Path

import yaml


def _paths(entries: list) -> list[str]:
    """dvc.yaml deps/outs entries are plain strings or single-key mappings with options."""
    out = []
    for entry in entries or []:
        out.append(entry if isinstance(entry, str) else next(iter(entry)))
    return out


def _covers(out: str, dep: str) -> bool:
    out, dep = out.rstrip("/"), dep.rstrip("/")
    return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")


def stage_graph(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, set[str]]:
    """{stage: upstream stages}: stage B depends on A when a dep of B lies in (or holds) an out of A."""
    path = Path(dvc_yaml)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dvc.yaml; run the flow from the repository root")
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    if not stages:
        raise ValueError(f"{path}: defines no stages")
    for name, spec in stages.items():
        if "foreach" in spec or "matrix" in spec:
            raise ValueError(f"{path}: stage '{name}' uses foreach/matrix, which the flow does not expand yet")
    outs = {name: _paths(spec.get("outs", [])) + _paths(spec.get("metrics", [])) + _paths(spec.get("plots", []))
            for name, spec in stages.items()}
    graph: dict[str, set[str]] = {}
    for name, spec in stages.items():
        deps = _paths(spec.get("deps", []))
        graph[name] = {other for other, other_outs in outs.items() if other != name
                       and any(_covers(o, d) for o in other_outs for d in deps)}
    return graph


def stage_order(dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """Stages in a valid execution order (raises graphlib.CycleError on a cycle)."""
    return list(graphlib.TopologicalSorter(stage_graph(dvc_yaml)).static_order())
