"""Sweep planning, pure: the grid of trials an axis list means, their experiment names, and which trials a
rerun still has to run, from what DVC and MLflow report (read by the callers, so tests need neither).

A trial is one DVC experiment named ``<prefix>-<key>-<value>...``: each override's key keeps its last part
(``retrieval.index_fraction`` -> ``index_fraction``) and its whole value (``0.5``, ``-1``, ``[1,2]`` -> ``1,2``).
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from knn_diffusion.config import load_params

GRID_SEPARATOR = "+"
# Trial runs whose experiment may count as done: RUNNING when the sweep died before it saw the experiment end.
DONE_STATUSES = ("FINISHED", "RUNNING")
# Characters a git ref (what DVC names an experiment by) may hold; others become "_". Brackets, braces,
# quotes and spaces of a list or mapping value are dropped: [1, 2] -> 1,2.
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.,+-]+")
_VALUE_NOISE = re.compile(r"[\[\]{}'\" ]")


class SweepBusy(RuntimeError):
    """The sweep, or one of its experiments, is being run by a live process: resuming it would run it twice."""


def split_values(values: str) -> list[str]:
    """'1,[2,3],{a: 4}' -> ['1', '[2,3]', '{a: 4}']: commas inside brackets or braces belong to a value."""
    found, depth, start = [], 0, 0
    for i, char in enumerate(values):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            found.append(values[start:i])
            start = i + 1
    return found + [values[start:]]


def expand_grid(axes: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x'] -> [['a=1', 'b=x'], ['a=2', 'b=x']] (the cartesian product). A '+' between axes
    starts another grid, whose trials are added: ['a=1,2', '+', 'b=y'] -> [['a=1'], ['a=2'], ['b=y']]."""
    grids: list[list[list[str]]] = [[]]
    for axis in axes:
        if axis == GRID_SEPARATOR:
            grids.append([])
            continue
        if "=" not in axis:
            raise ValueError(f"sweep axis {axis!r}: expected key=value1,value2,... or '{GRID_SEPARATOR}'")
        key, values = axis.split("=", 1)
        grids[-1].append([f"{key}={value}" for value in split_values(values)])
    if not all(grids):
        raise ValueError(f"sweep axes {axes}: '{GRID_SEPARATOR}' must stand between two grids")
    combos = [list(combo) for grid in grids for combo in itertools.product(*grid)]
    return list({tuple(combo): combo for combo in combos}.values())  # a trial listed twice runs once


def experiment_name(prefix: str, overrides: list[str]) -> str:
    """``sweep`` + ['retrieval.index_fraction=0.5', 'train_continuous.k=-1'] -> ``sweep-index_fraction-0.5-k--1``."""
    parts = [prefix]
    for override in overrides:
        key, value = override.split("=", 1)
        parts += [key.split(".")[-1], _VALUE_NOISE.sub("", value)]
    name = re.sub(r"\.{2,}", ".", _NAME_UNSAFE.sub("_", "-".join(parts)))  # ".." is no git ref
    return name[:90].rstrip(".")


def merge_overrides(*lists: list[str] | tuple[str, ...]) -> list[str]:
    """Override lists in order, a later value of a key replacing an earlier one."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for override in overrides:
            merged[override.split("=", 1)[0]] = override
    return list(merged.values())


def trials_of(axes: list[str], repo: Path, prefix: str, base: list[str] | tuple[str, ...] = ()
              ) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """({experiment name: overrides}, {experiment name: its validated params}); bad axes or values raise.
    ``base``: overrides every trial shares (a trial's own value of a key wins), not part of the names."""
    grid = expand_grid(axes)
    combos = {experiment_name(prefix, combo): merge_overrides(base, combo) for combo in grid}
    if len(combos) < len(grid):
        raise ValueError(f"sweep axes {axes}: two trials get the same experiment name (names keep only each "
                         f"key's last part): {sorted(combos)}")
    return combos, {name: load_params(repo / "params.yaml", combo) for name, combo in combos.items()}


def with_overrides(params: dict, overrides: list[str]) -> dict:
    """params.yaml's content as a queued experiment with ``overrides`` gets it (values parsed as YAML, like
    ``dvc exp run -S``)."""
    params = copy.deepcopy(params)
    for override in overrides:
        key, value = override.split("=", 1)
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return params


@dataclass
class TrialPlan:
    done: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)  # run by a live queue worker of the dead sweep: waited for
    to_run: dict[str, dict | None] = field(default_factory=dict)  # with the dead queue task each left, or None


def plan_trials(combos: dict[str, list[str]], params_file: dict, known: dict[str, dict],
                previous: dict[str, str], alive: Callable[[int | None], bool]) -> TrialPlan:
    """Which trials of ``combos`` are done, run by a live queue worker, or still to run.

    ``params_file``: params.yaml's content; ``known``: DVC's experiments (``dvc_cli.dvc_experiments``);
    ``previous``: {trial: MLflow status of its trial run} in the sweep being resumed; ``alive(pid)``.
    Done: its experiment succeeded from this commit with the same params, and its trial run FINISHED (or is
    still RUNNING: the sweep died before it saw the experiment end). A FAILED or KILLED trial runs again.
    Raises :class:`SweepBusy` when a live process outside the resumed sweep runs one of them.
    """
    plan = TrialPlan()
    for name, overrides in combos.items():
        info = known.get(name, {})
        running = info.get("running")
        busy = bool(running) and alive(running["pid"])
        if busy and name in previous:
            plan.live.append(name)
        elif busy:
            raise SweepBusy(f"experiment '{name}' is being run by another process (pid {running['pid']}): "
                            f"wait for it, or stop it with `dvc queue kill {name}` (a sweep resumes an earlier "
                            "one only from the same git commit with the same uncommitted changes)")
        elif (info.get("succeeded") and not running and previous.get(name) in DONE_STATUSES
              and info.get("params") == with_overrides(params_file, overrides)):
            plan.done.append(name)
        else:
            plan.to_run[name] = running
    return plan
