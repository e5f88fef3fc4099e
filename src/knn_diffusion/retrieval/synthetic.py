"""A seeded generator of clustered unit vectors, for benchmarks and tests with exact ground truth.

Vectors: ``n_clusters`` centres drawn N(0, I) and normalised (from ``seed``); each vector is a centre
chosen uniformly plus isotropic Gaussian noise of total norm about ``noise`` (per-coordinate sigma
``noise / sqrt(d)``), then normalised. Rows are made in fixed blocks of ``BLOCK`` rows, block b from
``numpy.random.default_rng([seed, stream, b])``, so row i is the same whatever ``n`` or chunking is
asked for: the first 100k rows of the 1M set are the 100k set. ``stream`` 1 is the database and
stream 2 the held-out queries.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

BLOCK = 65_536
DATABASE, QUERIES = 1, 2


def cluster_centres(d: int, n_clusters: int, seed: int) -> np.ndarray:
    centres = np.random.default_rng(seed).standard_normal((n_clusters, d), dtype=np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def clustered_blocks(n: int, d: int = 512, *, n_clusters: int = 2_000, noise: float = 0.6,
                     seed: int = 0, stream: int = DATABASE) -> Iterator[np.ndarray]:
    """Yield float32 unit rows (<= BLOCK, d), n rows in all."""
    centres = cluster_centres(d, n_clusters, seed)
    for block, lo in enumerate(range(0, n, BLOCK)):
        rng = np.random.default_rng([seed, stream, block])
        rows = BLOCK  # draw the full block so row i never depends on n
        labels = rng.integers(n_clusters, size=rows)
        sigma = np.float32(noise / np.sqrt(d))
        x = centres[labels] + sigma * rng.standard_normal((rows, d), dtype=np.float32)  # (BLOCK, d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x[:min(BLOCK, n - lo)]


def clustered_vectors(n: int, d: int = 512, **kwargs) -> np.ndarray:
    """All n rows of :func:`clustered_blocks` as one (n, d) float32 array."""
    return np.concatenate(list(clustered_blocks(n, d, **kwargs)))
