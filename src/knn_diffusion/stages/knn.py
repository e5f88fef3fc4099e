"""DVC stage ``knn``: the k_max nearest neighbours of every training image, precomputed once.

Training reads this table instead of querying the index per step. Self matches and exact duplicates
(same content hash) are excluded; every row still has k_max neighbours.
"""

from __future__ import annotations

import logging

import numpy as np

from knn_diffusion.config import Params
from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.store import EmbeddingStore
from knn_diffusion.io import atomic_path, write_json
from knn_diffusion.retrieval.neighbours import training_neighbours
from knn_diffusion.retrieval.search import Searcher, vectors_by_id
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked

log = logging.getLogger(__name__)


def knn_stage(params: Params) -> None:
    cfg = params.knn
    name = params.data.generator_dataset
    with tracked("knn", params) as run:
        images = ImageStore.open(paths.dataset_dir(name))
        store = EmbeddingStore.open(paths.embedding_dir(name))
        searcher = Searcher.open(paths.index_dir(name), store.fingerprint, store.dim,
                                 get_vectors=vectors_by_id(store.ids, store.get))
        rows = images.rows("train")
        hashes = images.manifest.set_index("row")["content_hash"]
        ids, scores = training_neighbours(searcher, store.get(store.positions_of(rows)), rows, cfg.k_max,
                                          content_hashes=hashes.to_numpy(), batch_size=cfg.batch_size)
        self_matches = int((ids == rows[:, None]).sum())
        duplicate_ids = int(sum(len(r) - len(set(r)) for r in ids.tolist()))
        same_hash = int((hashes.to_numpy()[ids] == hashes.to_numpy()[rows][:, None]).sum())
        with atomic_path(paths.neighbours_file(name)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, rows=rows, ids=ids, scores=scores)
        report = {"images": len(rows), "k_max": cfg.k_max, "self_matches": self_matches,
                  "duplicate_ids": duplicate_ids, "same_content_hash": same_hash,
                  "score_top1_mean": float(scores[:, 0].mean()), "score_kmax_mean": float(scores[:, -1].mean())}
        run.metrics({k: v for k, v in report.items() if isinstance(v, (int, float))})
        write_json(paths.KNN_METRICS, report)
        log.info("%d training images x %d neighbours; self matches %d, duplicate ids %d, top-1 score %.3f",
                 len(rows), cfg.k_max, self_matches, duplicate_ids, report["score_top1_mean"])


def main(argv: list[str] | None = None) -> None:
    run_stage("knn", knn_stage, argv)


if __name__ == "__main__":
    main()
