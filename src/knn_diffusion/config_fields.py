"""Field metadata, the error type and the plain-data helpers shared by every params section (kept apart to
avoid import cycles: any module may import this one)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A params file or override that does not fit the schema."""


def between(low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> dict[str, Any]:
    """Field metadata for a numeric range; ``None`` leaves that side unbounded."""
    return {"range": (low, high, low_open, high_open)}


def out_of_range(metadata: Any, value: Any) -> str | None:
    """What ``value`` should be when it breaks the field's ``between`` range (NaN and inf never fit), else None."""
    if "range" not in metadata or value is None or isinstance(value, bool):
        return None
    low, high, low_open, high_open = metadata["range"]
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high or (isinstance(value, float) and not math.isfinite(value))):
        return None
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    return f"expected a number in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"


def check_field(owner: type, name: str, value: Any, label: str) -> None:
    """Check a value meant for field ``name`` of dataclass ``owner`` against that field's range
    (e.g. a command-line option); the ConfigError names it as ``label``."""
    problem = out_of_range(next(f for f in dataclasses.fields(owner) if f.name == name).metadata, value)
    if problem:
        raise ConfigError(f"{label} {value!r}: {problem}")


def to_plain(params: Any) -> Any:
    """Dataclasses/enums -> plain YAML-able python (for logging and writing params files)."""
    return OmegaConf.to_container(OmegaConf.structured(params), enum_to_str=True)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {'a.b.c': value}; MLflow params are flat."""
    if dataclasses.is_dataclass(tree):
        tree = to_plain(tree)
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def check_output_folder(out: str | Path, command: str) -> None:
    """Refuse an ``--out`` that a run of ``command`` must not replace: a file, a folder of something else
    (non-empty without the ``grid.png`` such a run writes), or the working directory or one above it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "grid.png").is_file())):
        raise ConfigError(f"--out {out}: exists and is not the folder of an earlier {command} run (no grid.png); "
                          "name a new folder")
    if out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise ConfigError(f"--out {out}: is the working directory or one above it; name a new folder")
