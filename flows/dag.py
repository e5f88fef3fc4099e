"""The stage DAG, read from dvc.yaml so the flow never keeps a second list of stages.

Stages are those DVC resolves: a ``matrix``/``foreach`` entry is one stage per item (``evaluate@discrete``).
"""

from __future__ import annotations

import graphlib
from collections.abc import Iterable
from pathlib import Path

from knn_diffusion.stages.common import dvc_stages


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
    stages = dvc_stages(path)
    if not stages:
        raise ValueError(f"{path}: defines no stages")
    outs = {name: _paths(spec.get("outs", [])) + _paths(spec.get("metrics", [])) + _paths(spec.get("plots", []))
            for name, spec in stages.items()}
    graph: dict[str, set[str]] = {}
    for name, spec in stages.items():
        deps = _paths(spec.get("deps", []))
        graph[name] = {other for other, other_outs in outs.items() if other != name
                       and any(_covers(o, d) for o in other_outs for d in deps)}
    return graph


def stages_after(graph: dict[str, set[str]]) -> dict[str, int]:
    """{stage: the number of stages on the longest chain of stages that need it} (0: nothing needs it);
    raises graphlib.CycleError on a cycle."""
    downstream: dict[str, set[str]] = {name: set() for name in graph}
    for name, upstream in graph.items():
        for other in upstream:
            downstream[other].add(name)
    after: dict[str, int] = {}
    for name in reversed(list(graphlib.TopologicalSorter(graph).static_order())):
        after[name] = max((after[d] + 1 for d in downstream[name]), default=0)
    return after


def stage_order(graph: dict[str, set[str]], running: Iterable[str] | None = None) -> list[str]:
    """The stages of ``running`` (default: all of ``graph``) in a valid execution order, the longest chain
    first: of two stages, the one with more running stages after it comes first, dvc.yaml's order among
    equals. The flow starts the earliest ready stage in this order, so a stage with a long chain after it
    never waits behind one with a shorter chain; a chain through stages that do not run (a skipped
    backbone, stages not asked for) does not count. DVC records no durations, so a chain is counted in
    stages, not seconds. The order is valid because a stage always has more stages after it than any
    stage that needs it.
    """
    running = set(graph) if running is None else set(running)
    subgraph = {name: upstream & running for name, upstream in graph.items() if name in running}
    after = stages_after(subgraph)
    return sorted(subgraph, key=lambda name: -after[name])


def named_stages(names: list[str], order: list[str]) -> dict[str, list[str]]:
    """{name: the stages it means}: a stage, or a matrix/foreach entry's name alone for all its items (as
    ``dvc repro evaluate`` does); an unknown name means none."""
    return {name: [s for s in order if s == name or s.split("@")[0] == name] for name in names}


def with_upstream(names: list[str], graph: dict[str, set[str]], order: list[str]) -> list[str]:
    """The stages ``names`` mean (:func:`named_stages`) and every stage upstream of them, in ``order``;
    an unknown name raises ValueError listing the stages."""
    items = named_stages(names, order)  # "evaluate": evaluate@continuous and evaluate@discrete
    unknown = sorted(name for name, found in items.items() if not found)
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: dvc.yaml defines {order}")
    wanted: set[str] = set()
    pending = [s for found in items.values() for s in found]
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(graph[name])
    return [s for s in order if s in wanted]


def stage_meta(key: str, dvc_yaml: str | Path = "dvc.yaml") -> dict[str, object]:
    """{stage: value} of ``meta: {key: value}`` for the stages of dvc.yaml that set it."""
    return {name: spec["meta"][key] for name, spec in dvc_stages(dvc_yaml).items()
            if isinstance(spec.get("meta"), dict) and key in spec["meta"]}


def stage_backbones(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, str]:
    """{stage: backbone} for the stages that belong to one generator backbone (``meta: {backbone: ...}``)."""
    return {name: str(value) for name, value in stage_meta("backbone", dvc_yaml).items()}


def stages_on_all_cores(dvc_yaml: str | Path = "dvc.yaml") -> set[str]:
    """Stages that run alone with every core when stages run side by side (``meta: {all_cores: true}``): a
    stage on the critical path with nothing long enough to fill the other cores beside it."""
    return {name for name, value in stage_meta("all_cores", dvc_yaml).items() if value is True}


def without_backbones(graph: dict[str, set[str]], backbone_of: dict[str, str], keep: set[str]) -> set[str]:
    """Stages to skip: those of a backbone not in ``keep``, and those downstream of backbone stages none
    of which is kept (``human_eval``, fed by every backbone's ``evaluate``, runs while one is kept)."""
    ancestors: dict[str, set[str]] = {}
    for name in graphlib.TopologicalSorter(graph).static_order():
        ancestors[name] = set().union(*(ancestors[u] | {u} for u in graph[name]))
    skipped = set()
    for name in graph:
        owners = {backbone_of[name]} if name in backbone_of else {backbone_of[a] for a in ancestors[name]
                                                                   if a in backbone_of}
        if owners and not owners & keep:
            skipped.add(name)
    return skipped
