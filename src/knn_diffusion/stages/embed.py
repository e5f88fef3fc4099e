"""DVC stage ``embed``: image embeddings of every ingested dataset + text embeddings of the eval prompts.

Resumable: the out is ``persist``-ed, complete shards of an interrupted run with the same encoder,
ids and image content are kept, and each shard is written atomically. With ``embed.workers > 0`` (or a
``embed.dask_address``) shards are embedded in parallel on a Dask cluster (``encoders/parallel.py``).
"""

from __future__ import annotations

import logging
import shutil
import time

from knn_diffusion.config import Params
from knn_diffusion.data.store import ImageStore
from knn_diffusion.encoders.factory import load_encoder
from knn_diffusion.encoders.parallel import embed_shards_parallel
from knn_diffusion.encoders.store import begin_embedding, embed_collection, finish_embedding, save_text_embeddings
from knn_diffusion.io import read_json, write_json
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked

log = logging.getLogger(__name__)


def ingested_datasets() -> list[str]:
    """Every ingested dataset but the encoders' paired corpora (``pairs_only``: never embedded or indexed)."""
    return sorted(p.name for p in paths.INGEST.iterdir() if (p / "manifest.parquet").is_file()
                  and not read_json(p / "meta.json").get("pairs_only", False))


def remove_stale_stores(datasets: list[str]) -> None:
    """The out is persisted for resuming, so drop stores of datasets that are no longer ingested."""
    if paths.EMBED.is_dir():
        for stale in [p for p in paths.EMBED.iterdir() if p.is_dir() and p.name not in datasets]:
            log.info("removing embeddings of dataset '%s' (no longer ingested)", stale.name)
            shutil.rmtree(stale)


def embed_stage(params: Params) -> None:
    cfg = params.embed
    with tracked("embed", params) as run:
        encoder = load_encoder(params.encoder, paths.ENCODER)
        report: dict = {"dim": encoder.dim, "datasets": {}}  # the fingerprint is in each store's meta.json
        remove_stale_stores(ingested_datasets())
        for name in ingested_datasets():
            images = ImageStore.open(paths.dataset_dir(name))
            out = paths.embedding_dir(name)
            content = images.content_digest(images.rows())  # re-ingested pixels never reuse old vectors
            start = time.perf_counter()
            if cfg.workers > 0 or cfg.dask_address:
                pending = begin_embedding(out, encoder.fingerprint, encoder.dim, images.rows(), cfg.shard_size,
                                          cfg.dtype.value, encoder.description, content)
                embed_shards_parallel(params.encoder, paths.ENCODER, images.root, out, pending,
                                      shard_size=cfg.shard_size, batch_size=cfg.batch_size, dtype=cfg.dtype.value,
                                      workers=cfg.workers, address=cfg.dask_address)
                store = finish_embedding(out)
            else:
                store = embed_collection(encoder, images, images.rows(), out, cfg.shard_size, cfg.batch_size,
                                         cfg.dtype.value, content=content)
            seconds = time.perf_counter() - start
            report["datasets"][name] = {"images": len(store), "seconds": round(seconds, 2),
                                        "images_per_s": round(len(store) / max(seconds, 1e-9), 1)}
            run.metrics({f"{name}.images": len(store), f"{name}.images_per_s": len(store) / max(seconds, 1e-9)})
            log.info("%s: %d embeddings (d=%d) at %.0f images/s", name, len(store), store.dim,
                     len(store) / max(seconds, 1e-9))

        generator = ImageStore.open(paths.dataset_dir(params.data.generator_dataset))
        test_names = generator.read_captions().loc[generator.rows("test")].dropna()
        prompts = sorted({params.encoder.prompt_template.format(name=n) for n in test_names if n.strip()})
        if not prompts:
            log.info("no eval prompts: the test split of '%s' has no captions (an image-only dataset)",
                     params.data.generator_dataset)
        save_text_embeddings(encoder, prompts, paths.EVAL_PROMPTS)
        report["eval_prompts"] = len(prompts)
        write_json(paths.EMBED_METRICS, report)


def main(argv: list[str] | None = None) -> None:
    run_stage("embed", embed_stage, argv)


if __name__ == "__main__":
    main()
