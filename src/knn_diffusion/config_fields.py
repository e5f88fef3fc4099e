"""Field metadata and the error type shared by every params section (kept apart to avoid import cycles)."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A params file or override that does not fit the schema."""


def between(low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> dict[str, Any]:
    """Field metadata for a numeric range; ``None`` leaves that side unbounded."""
    return {"range": (low, high, low_open, high_open)}

