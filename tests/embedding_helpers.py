"""A small real embedding store for retrieval tests: clustered vectors under ids that are not row positions."""

from pathlib import Path

import numpy as np

from knn_diffusion.encoders.store import begin_embedding, emb_name, finish_embedding, ids_name
from knn_diffusion.io import save_npy
from knn_diffusion.retrieval.synthetic import clustered_vectors


def write_clustered_store(store: Path, n: int, d: int, shard_rows: int = 1_000) -> tuple[np.ndarray, np.ndarray]:
    """Write n clustered vectors with ids 3, 10, 17, ... as an EmbeddingStore at ``store``; return (vectors, ids)."""
    vectors = clustered_vectors(n, d, n_clusters=20, seed=3)
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    for shard in begin_embedding(store, "enc", d, ids, shard_rows, "float32"):
        rows = slice(shard * shard_rows, (shard + 1) * shard_rows)
        save_npy(store / emb_name(shard), vectors[rows])
        save_npy(store / ids_name(shard), ids[rows])
    finish_embedding(store)
    return vectors, ids
