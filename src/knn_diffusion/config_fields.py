"""Field metadata and the error type shared by every params section (kept apart to avoid import cycles)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


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
