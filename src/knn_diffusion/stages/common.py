"""What every stage shares: argument parsing, params loading, error reporting, its MLflow run.

A stage's params sections are declared once, in its ``params:`` list in dvc.yaml. The stage body gets
a read-only view of the params that refuses any key outside that list (``tracking`` excepted: it
only says where runs are logged), so a stage cannot depend on a setting DVC does not track.
A ``matrix`` stage of dvc.yaml is one DVC stage per item, named as DVC names them (``evaluate@discrete``);
its module takes the item as ``--model`` and looks itself up under that name.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import os
import sys
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterator

from knn_diffusion.config import Backbone, ConfigError, Params, load_params, to_plain
from knn_diffusion.tracking import StageRun, TrackingUnavailable, repo_root, stage_run, tracking_uri
from knn_diffusion.tracking.server import server_errors

log = logging.getLogger(__name__)
# Read by every stage without being declared: where runs are logged, and how many threads compute (the
# last bits of a float, never what a stage means: DVC's run cache serves a run made at another thread count,
# so a `--parallel 2` sweep never retrains what a plain run made).
UNTRACKED_SECTIONS = ("tracking", "runtime")
# What the flows set for the stage processes they start, and what torch, faiss and child processes read.
THREADS_ENV = "OMP_NUM_THREADS"
# The project's own dvc.yaml, for stages run outside a DVC repo (tests, ad-hoc runs in a scratch dir).
PROJECT_DVC_YAML = Path(__file__).resolve().parents[3] / "dvc.yaml"


class UndeclaredParamError(ConfigError):
    """A stage read a params key that its dvc.yaml entry does not declare."""


def dvc_yaml_path() -> Path:
    here = repo_root() / "dvc.yaml"
    return here if here.is_file() else PROJECT_DVC_YAML


def dvc_stages(path: str | Path) -> dict[str, dict]:
    """{stage name: definition} of a dvc.yaml as DVC resolves it: ``foreach``/``matrix`` stages expanded
    into one stage per item (``sample@continuous``) with ``${item...}`` filled in, by DVC's own parser."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: dvc.yaml not found; stages declare their params there")
    return copy.deepcopy(_resolved(path, path.stat().st_mtime_ns))


@lru_cache(maxsize=8)
def _resolved(path: Path, mtime_ns: int) -> dict:
    import yaml
    from dvc.fs import LocalFileSystem
    from dvc.parsing import DataResolver

    class _Workspace:  # what DataResolver reads of a Repo: no .dvc/ needed (stages also run in scratch dirs)
        fs = LocalFileSystem()
        config: dict = {}

    spec = yaml.safe_load(path.read_text()) or {}
    return DataResolver(_Workspace(), str(path.parent), spec).resolve().get("stages") or {}


def declared_params(stage: str, dvc_yaml: Path | None = None) -> list[str]:
    """The params keys (sections or dotted keys of params.yaml) that dvc.yaml lists for ``stage``."""
    path = dvc_yaml or dvc_yaml_path()
    stages = dvc_stages(path)
    if stage not in stages:
        raise ConfigError(f"{path}: no stage '{stage}' (stages: {', '.join(stages)})")
    keys: list[str] = []
    for entry in stages[stage].get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        else:  # {params_file: [keys]}: only params.yaml feeds the typed schema
            keys.extend(key for file, listed in entry.items() if file == "params.yaml" for key in listed or [])
    return keys


class ParamsView:
    """Read-only access to the declared part of :class:`Params` (or of one of its sections).

    Reading a declared key (or anything below one) gives a copy of its value; reading a section of
    which only some keys are declared gives a view of it; anything else raises
    :class:`UndeclaredParamError` naming the stage and the key.
    """

    def __init__(self, node: Any, stage: str, declared: tuple[str, ...], prefix: str = ""):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_declared", declared)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._node, name)
        key = f"{self._prefix}{name}"
        if any(key == d or key.startswith(d + ".") for d in self._declared):
            return copy.deepcopy(value)
        if dataclasses.is_dataclass(value) and any(d.startswith(key + ".") for d in self._declared):
            return ParamsView(value, self._stage, self._declared, key + ".")
        raise UndeclaredParamError(f"stage '{self._stage}' reads params key '{key}', which dvc.yaml does not "
                                   f"declare for it (declared: {[d for d in self._declared if d != 'tracking']}); "
                                   "add it to the stage's params in dvc.yaml")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"params are read-only in a stage (tried to set '{self._prefix}{name}')")

    def declared_plain(self) -> dict[str, Any]:
        """{declared key: plain value} for logging (the view's own key paths, dotted)."""
        plain = to_plain(self._node)
        out = {}
        for key in self._declared:
            if key in UNTRACKED_SECTIONS:
                continue
            tree = plain
            for part in key.split("."):
                tree = tree[part]
            out[key] = tree
        return out


def stage_params(params: Params, stage: str) -> ParamsView:
    return ParamsView(params, stage, tuple(declared_params(stage)) + UNTRACKED_SECTIONS)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_process(side_by_side: int = 1) -> int:
    """Threads for each of ``side_by_side`` processes sharing this one's budget: an exported
    ``OMP_NUM_THREADS`` (the whole run's), else the usable cores, divided among them (at least 1)."""
    budget = int(os.environ.get(THREADS_ENV) or 0) or usable_cores()
    return max(1, budget // max(side_by_side, 1))


def pin_threads(threads: int) -> int:
    """Use ``threads`` (``runtime.threads``; 0: :func:`threads_per_process`) in this process and those it
    starts. Training on a CPU gives the same bytes only at the same thread count."""
    count = threads or threads_per_process()
    os.environ[THREADS_ENV] = str(count)  # torchrun ranks, Dask workers, and a torch imported later
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)
    return count


class WrongInterpreterError(RuntimeError):
    """A stage started by a Python that is not this checkout's environment."""


def check_interpreter(stage: str, root: Path | None = None) -> None:
    """Refuse to run when the checkout has its own venv but this is another Python running other code.

    DVC runs a stage's ``python -m ...`` with the first ``python`` on PATH; ``.venv/bin/dvc repro``
    without the venv activated starts the system one, after DVC has already deleted the outputs.
    """
    root = root or repo_root()
    venv, checkout_code = root / ".venv", root / "src" / "knn_diffusion"
    running_code = Path(__file__).resolve().parents[1]
    if not venv.is_dir() or Path(sys.prefix).resolve() == venv.resolve() or running_code == checkout_code.resolve():
        return
    raise WrongInterpreterError(
        f"stage '{stage}' was started by {sys.executable} (knn_diffusion from {running_code}), not by this "
        f"checkout's {venv / 'bin' / 'python'} ({checkout_code}). DVC runs the first `python` on PATH: "
        f"`source .venv/bin/activate` first, or use `make dvc ARGS=\"repro {stage}\"`. "
        f"DVC has already removed the stage's outputs: `dvc checkout {stage}` restores the cached ones.")


def run_stage(name: str, body: Callable[..., None], argv: list[str] | None = None,
              user_errors: tuple[type[Exception], ...] = (), per_model: bool = False) -> None:
    """Parse ``[--params FILE] [key=value ...]``, validate, run ``body`` on the stage's declared params.

    ``per_model``: a dvc.yaml ``matrix`` stage over ``model``; ``--model`` (default continuous) picks the
    backbone, the stage is ``<name>@<model>`` (DVC's name) and ``body(params, model)`` runs.
    Bad config, the exception types in ``user_errors`` (input the user can fix) and a tracking server that
    stops answering (the flows retry the stage once it is back) end as one ``error: ...`` line and exit code 2.
    """
    parser = argparse.ArgumentParser(prog=f"python -m knn_diffusion.stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if per_model:
        parser.add_argument("--model", default=Backbone.continuous.value, choices=[b.value for b in Backbone],
                            help="which trained backbone (models/<model>); the DVC stage is %(prog)s@<model>")
    parser.add_argument("overrides", nargs="*", help="ad-hoc overrides as key=value (validated)")
    args = parser.parse_args(argv)
    if per_model:
        name, body = f"{name}@{args.model}", partial(body, model=args.model)
    try:
        check_interpreter(name)
    except WrongInterpreterError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's API client logs every request
    logging.getLogger("distributed").setLevel(logging.WARNING)  # a Dask cluster's start/stop chatter (embed)
    try:
        params = stage_params(load_params(args.params, args.overrides), name)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    pin_threads(params.runtime.threads)
    try:  # any MLflow call of the stage, its own run's or a look-up of another run
        with server_errors(tracking_uri(params.tracking.tracking_uri), f"during stage '{name}'"):
            body(params)
    except (UndeclaredParamError, TrackingUnavailable, *user_errors) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def dvc_input_hashes(root: Path, stage: str) -> dict[str, str]:
    """The DVC hash of each dep of ``stage`` as it is now (what this run reads), by DVC's own code.

    Computed, not read from dvc.lock: while ``dvc repro`` runs a stage, the lock file still holds
    the previous run's hashes. Outside a DVC repo (or for a stage it does not define) there are none.
    """
    if not (root / ".dvc").is_dir():
        return {}
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        try:
            (spec,) = repo.stage.collect(stage)
        except Exception as err:  # no such stage in this repo's dvc.yaml
            log.warning("no DVC input hashes for '%s': %s", stage, str(err).splitlines()[0])
            return {}
        hashes = {f"dvc.dep.{dep.def_path}": dep.get_hash().value for dep in spec.deps
                  if not isinstance(dep, ParamsDependency) and dep.exists}
    return hashes


@contextlib.contextmanager
def tracked(stage: str, params: ParamsView, *sections: str, tags: dict[str, str] | None = None) -> Iterator[StageRun]:
    """The stage's MLflow run, logging the params it declares in dvc.yaml and tagged with the DVC
    hashes of its inputs as they are at the start of the run, and with ``tags``.

    A matrix stage's run (``evaluate@discrete``) is tagged ``stage=evaluate`` and ``dvc.stage`` with
    the full name, so searches by stage find every item's runs.
    ``sections`` (optional, from before dvc.yaml was the single source) must each be declared there.
    """
    declared = declared_params(stage)
    missing = [s for s in sections if not any(s == d or s.startswith(d + ".") for d in declared)]
    if missing:
        raise UndeclaredParamError(f"stage '{stage}' logs params {missing} that dvc.yaml does not declare for it")
    base = stage.split("@")[0]
    with stage_run(base, params.declared_plain(), params.tracking.experiment, params.tracking.tracking_uri,
                   tags={**dvc_input_hashes(repo_root(), stage), "dvc.stage": stage,
                         "runtime.threads": os.environ.get(THREADS_ENV, ""), **(tags or {})},
                   run_name=stage) as run:
        yield run
