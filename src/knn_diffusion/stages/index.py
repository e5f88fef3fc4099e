"""DVC stage ``index``: a tuned FAISS index per embedded dataset (the generator's, and any other for swaps).

The factory is chosen by size and memory budget unless params name one; nprobe/efSearch are tuned to
the target recall against exact search; the sidecar records factory, fingerprint, recall and device:
only what a rebuild reproduces, so an unchanged index keeps its DVC hash (the build time goes to
metrics/index.json). Beside each index, ``scores.npz`` holds a per-image score column (colourfulness,
or the LAION aesthetic head when its weights are given) for ``retrieval.global_score_filter`` and
``retrieval.score_quantile`` at inference. With ``index.shard_workers > 0`` an inverted-file index is built on
Dask workers and merged on disk (``retrieval/sharded.py``); the vectors are read from the store in batches.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from knn_diffusion.config import Params, flatten
from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.store import EmbeddingStore
from knn_diffusion.io import atomic_dir, atomic_path, write_json
from knn_diffusion.retrieval.build import build_tuned_index
from knn_diffusion.retrieval.config import IndexConfig, Scorer
from knn_diffusion.retrieval.index import choose_factory
from knn_diffusion.retrieval.inference import SCORES_FILE, embeddings_facts
from knn_diffusion.retrieval.scores import image_scores, resolve_scorer
from knn_diffusion.retrieval.search import vectors_by_id
from knn_diffusion.retrieval.sharded import StoreRows, build_sharded_index, sharded_factory
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked

log = logging.getLogger(__name__)


def embedded_datasets() -> list[str]:
    return sorted(p.name for p in paths.EMBED.iterdir() if (p / "meta.json").is_file())


def write_score_column(cfg: IndexConfig, store: EmbeddingStore, ids: np.ndarray, index_dir: Path) -> None:
    """Per-image scores beside the index, for ``retrieval.global_score_filter`` and ``retrieval.score_quantile``
    at inference (paper Fig. 7-8)."""
    scorer = resolve_scorer(cfg.scorer, cfg.scorer_weights)
    embeddings, batches = None, None
    if scorer == Scorer.laion_aesthetic:
        embeddings = store.get(store.positions_of(ids))
    else:
        images = ImageStore.open(paths.dataset_dir(index_dir.name))
        batches = (images[ids[i:i + 1024]] for i in range(0, len(ids), 1024))
    scores = image_scores(scorer, cfg.scorer_weights, embeddings=embeddings, image_batches=batches)
    with atomic_path(index_dir / SCORES_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=ids, scores=scores, scorer=np.array(scorer.value))


def index_stage(params: Params) -> None:
    cfg = params.index
    with tracked("index", params) as run:
        report: dict = {}
        with atomic_dir(paths.INDEX) as out:
            for name in embedded_datasets():
                store = EmbeddingStore.open(paths.embedding_dir(name))
                positions = np.arange(len(store))
                if name == params.data.generator_dataset:
                    images = ImageStore.open(paths.dataset_dir(name))
                    keep = np.concatenate([images.rows(split) for split in cfg.generator_splits])
                    positions = np.flatnonzero(np.isin(store.ids, keep))
                start = time.perf_counter()
                facts = dict(get_vectors=vectors_by_id(store.ids, store.get), dataset=name,
                             embeddings=embeddings_facts(store),
                             splits=cfg.generator_splits if name == params.data.generator_dataset else "all")
                factory = choose_factory(len(positions), store.dim, cfg.bytes_per_vector) \
                    if cfg.factory == "auto" else cfg.factory
                if cfg.shard_workers > 0 and sharded_factory(factory) is not None:
                    sidecar, shards = build_sharded_index(
                        StoreRows.of_store(store, positions), store.ids[positions], cfg, store.fingerprint, out / name,
                        workers=cfg.shard_workers, address=params.embed.dask_address,
                        memory_limit=cfg.shard_memory_limit, **facts)
                    log.info("%s: sharded build, %d shards, peak RSS per worker %s", name, shards["shards"],
                             shards["peak_rss_bytes"])
                else:
                    sidecar = build_tuned_index(store.vectors()[positions], store.ids[positions], cfg,
                                                store.fingerprint, out / name, **facts)
                write_score_column(cfg, store, store.ids[positions], out / name)
                # metrics: numbers only, timings included (the sidecar in the out holds the facts)
                report[name] = {k.replace("@", "_at_"): v for k, v in flatten(sidecar).items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)}
                report[name]["build_seconds"] = round(time.perf_counter() - start, 3)
                run.metrics({f"{name}.{k}": v for k, v in report[name].items()})
                run.tags({f"{name}.factory": str(sidecar.get("factory")), f"{name}.device": str(sidecar.get("device"))})
                log.info("%s: %s over %d vectors, recall %s with %s on %s", name, sidecar.get("factory"),
                         len(positions), sidecar.get("recall"), sidecar.get("search_params"), sidecar.get("device"))
        write_json(paths.INDEX_METRICS, report)


def main(argv: list[str] | None = None) -> None:
    run_stage("index", index_stage, argv)


if __name__ == "__main__":
    main()
