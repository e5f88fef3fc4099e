"""Content-hash disjointness of image sets that must not share a picture (training pairs vs held-out images)."""

from __future__ import annotations

from itertools import combinations
from typing import Iterable, Mapping


def check_disjoint(sets: Mapping[str, Iterable[str]]) -> None:
    """Raise ``ValueError`` naming the first pair of sets that share an image content hash, and how many."""
    hashes = {name: set(values) for name, values in sets.items()}
    for (a, set_a), (b, set_b) in combinations(hashes.items(), 2):
        shared = set_a & set_b
        if shared:
            raise ValueError(f"{a} and {b} share {len(shared)} image(s) by content hash "
                             f"(e.g. {sorted(shared)[0][:16]}); they must be disjoint")
