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


def stage_backbones(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, str]:
    """{stage: backbone} for the stages that belong to one generator backbone (``meta: {backbone: ...}``)."""
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}
    return {name: spec["meta"]["backbone"] for name, spec in stages.items()
            if isinstance(spec.get("meta"), dict) and "backbone" in spec["meta"]}


def without_backbones(graph: dict[str, set[str]], backbone_of: dict[str, str], keep: set[str]) -> set[str]:
    """Stages to skip: those of a backbone not in ``keep``, and every stage downstream of them."""
    skipped = {name for name, backbone in backbone_of.items() if backbone not in keep}
    changed = True
    while changed:
        more = {name for name, upstream in graph.items() if name not in skipped and upstream & skipped}
        skipped |= more
        changed = bool(more)
    return skipped
