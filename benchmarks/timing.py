"""The one timer of the benchmark scripts (imported as a sibling module: ``from timing import ...``).

:func:`clock` times one call; :func:`call_times` warms up, then repeats a call until both a minimum
number of runs and a minimum duration are reached (the faiss benchmarks' habit), timing each run.
``sync`` (e.g. :func:`cuda_sync`) runs before and after each timed call, so GPU work is counted.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def clock(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> tuple[Any, float]:
    """(what ``fn()`` returned, the seconds it took)."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    result = fn()
    if sync is not None:
        sync()
    return result, time.perf_counter() - start


def call_times(fn: Callable[[int], Any], *, warmup: int = 1, min_runs: int = 1, min_seconds: float = 0.0,
               sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each timed call ``fn(i)``; ``i`` counts every call, the ``warmup`` untimed ones first."""
    for i in range(warmup):
        fn(i)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        times.append(clock(lambda: fn(warmup + len(times)), sync)[1])
    return times


def median(times: list[float]) -> float:
    return float(statistics.median(times))


def cuda_sync(device) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` on a CUDA device, else nothing to wait for."""
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else None
