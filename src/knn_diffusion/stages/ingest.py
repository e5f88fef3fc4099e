"""DVC stage ``ingest``: every configured dataset -> data/ingest/<name>/ (shards, manifest, captions)."""

from __future__ import annotations

import logging

from knn_diffusion.config import Params
from knn_diffusion.data.ingest import ingest_dataset
from knn_diffusion.data.sources import SourceUnavailable
from knn_diffusion.data.store import ImageStore
from knn_diffusion.images import image_grid
from knn_diffusion.io import atomic_dir, write_json
from knn_diffusion.stages import paths
from knn_diffusion.stages.common import run_stage, tracked

log = logging.getLogger(__name__)


def ingest(params: Params) -> dict:
    data = params.data
    report: dict = {"datasets": {}}  # numbers only; why a dataset was skipped goes to the log and MLflow
    unavailable: dict[str, str] = {}
    with tracked("ingest", params) as run:
        with atomic_dir(paths.INGEST) as tmp:
            for name, ds in data.datasets.items():
                try:
                    summary = ingest_dataset(name, ds, data, tmp / name)
                except SourceUnavailable as err:
                    if not ds.optional:
                        raise
                    log.warning("dataset '%s' skipped: %s", name, err)
                    unavailable[name] = str(err)
                    report["datasets"][name] = {"available": 0}
                    run.metrics({f"{name}.available": 0})
                    run.tags({f"{name}.unavailable": str(err)[:5000]})
                    continue
                report["datasets"][name] = {
                    "available": 1, "images": summary.images, "duplicates": summary.duplicates,
                    "skipped": summary.skipped, "named_fraction": round(summary.named_fraction, 4),
                    "splits": summary.splits, "seconds": summary.seconds}
                run.metrics({f"{name}.images": summary.images, f"{name}.duplicates": summary.duplicates,
                             f"{name}.skipped": sum(summary.skipped.values()),
                             f"{name}.named_fraction": summary.named_fraction,
                             f"{name}.seconds": summary.seconds,
                             **{f"{name}.split.{k}": v for k, v in summary.splits.items()},
                             **{f"{name}.skipped.{k.replace(' ', '_')}": v for k, v in summary.skipped.items()}})
                store = ImageStore.open(tmp / name)
                count = min(params.tracking.sample_grid_size, len(store))
                rows = store.rows()[:: max(1, len(store) // count)][:count]
                run.image(image_grid(store[rows], columns=8), f"samples/{name}.png")
                log.info("%s: %d images (%d duplicates, skipped %s, %.0f%% named) in %.1fs", name,
                         summary.images, summary.duplicates, summary.skipped,
                         100 * summary.named_fraction, summary.seconds)
        if data.generator_dataset in unavailable:
            raise RuntimeError(f"data.generator_dataset '{data.generator_dataset}' was not ingested: "
                               f"{unavailable[data.generator_dataset]}")
        write_json(paths.INGEST_METRICS, report)
        run.artifact(paths.INGEST_METRICS)
    return report


def main(argv: list[str] | None = None) -> None:
    run_stage("ingest", ingest, argv)


if __name__ == "__main__":
    main()
