"""Deterministic, nested fractions of a collection for the index-size ablation.

Each id gets a uniform key in [0, 1) from a hash of (seed, id); the subset of fraction f is every id
whose key is below f. So the choice does not depend on order or on which other ids exist, and the
10% subset lies inside the 30% one for the same seed.
"""

from __future__ import annotations

import hashlib

import numpy as np


def subset_keys(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N,) float64 in [0, 1): blake2b of (seed, id) read as a 64-bit fraction."""
    salt = int(seed).to_bytes(16, "little", signed=True)
    keys = [int.from_bytes(hashlib.blake2b(int(i).to_bytes(8, "little", signed=True), digest_size=8,
                                           salt=salt).digest(), "little")
            for i in np.asarray(ids, dtype=np.int64)]
    return np.asarray(keys, dtype=np.uint64).astype(np.float64) / 2.0 ** 64


def subset_mask(ids: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """(N,) bool: the ids in the ``fraction`` subset (all of them for fraction 1)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"subset fraction {fraction!r}: expected a number in (0, 1]")
    if fraction == 1:
        return np.ones(len(ids), dtype=bool)
    return subset_keys(ids, seed) < fraction
