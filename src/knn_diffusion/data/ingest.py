"""Turn one configured source into an :class:`~knn_diffusion.data.store.ImageStore` directory."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from knn_diffusion.data import sources
from knn_diffusion.data.config import DataConfig, DatasetConfig, Source
from knn_diffusion.data.iconify import iconify_items
from knn_diffusion.data.store import shard_name
from knn_diffusion.io import atomic_path, save_npy, write_json


def split_for(content_hash: str, val: float, test: float) -> str:
    """Deterministic split from the content hash: the same image lands in the same split everywhere."""
    u = int(content_hash[:12], 16) / float(1 << 48)
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


SOURCES: dict[Source, Callable[[DatasetConfig, sources.SourceStats], Iterator[sources.RawImage]]] = {
    Source.openmoji: lambda ds, stats: sources.openmoji_items(stats, ds.limit),
    Source.noto: lambda ds, stats: sources.noto_items(stats, ds.limit),
    Source.folder: lambda ds, stats: sources.folder_items(ds.path, stats, ds.limit),
    Source.webdataset: lambda ds, stats: sources.webdataset_items(ds.path, stats, ds.limit),
    Source.iconify: lambda ds, stats: iconify_items(ds.path, stats, ds.limit),
}


def iter_source(ds: DatasetConfig, stats: sources.SourceStats) -> Iterator[sources.RawImage]:
    if ds.source not in SOURCES:
        raise sources.SourceError(f"unknown source {ds.source!r}: expected one of {[s.value for s in Source]}")
    return SOURCES[ds.source](ds, stats)


@dataclass
class IngestSummary:
    name: str
    source: str
    images: int = 0
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    named: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def named_fraction(self) -> float:
        return self.named / self.images if self.images else 0.0


def ingest_dataset(name: str, ds: DatasetConfig, data: DataConfig, out_dir: Path) -> IngestSummary:
    """Render/decode, normalise, dedupe, split and write one dataset to ``out_dir``."""
    start = time.perf_counter()
    stats = sources.SourceStats()
    background = tuple(data.background)
    seen: set[str] = set()
    rows: list[dict] = []
    captions: list[dict] = []
    buffer: list[np.ndarray] = []
    num_shards = 0
    summary = IngestSummary(name=name, source=ds.source.value)
    out_dir.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        nonlocal num_shards
        if buffer:
            save_npy(out_dir / shard_name(num_shards), np.stack(buffer))
            buffer.clear()
            num_shards += 1

    for item in tqdm(iter_source(ds, stats), desc=f"ingest {name}", unit="img", total=ds.limit):
        array = sources.to_square_array(item, data.resolution, background, data.glyph_fill)
        digest = hashlib.sha256(array.tobytes()).hexdigest()
        if digest in seen:
            summary.duplicates += 1
            continue
        seen.add(digest)
        row = len(rows)
        image_id = f"{name}-{digest[:16]}"
        rows.append({"row": row, "id": image_id, "source": ds.source.value, "origin": item.origin,
                     "content_hash": digest, "split": split_for(digest, data.split.val, data.split.test),
                     "shard": row // data.shard_size, "offset": row % data.shard_size})
        if item.caption:
            captions.append({"id": image_id, "caption": item.caption})
        buffer.append(array)
        if len(buffer) == data.shard_size:
            flush()
    flush()
    if not rows:
        raise sources.SourceError(f"dataset '{name}' ({ds.source.value}) produced no images; "
                                  f"skipped: {dict(stats.skipped) or 'none'}")

    manifest = pd.DataFrame(rows)
    with atomic_path(out_dir / "manifest.parquet") as tmp:
        manifest.to_parquet(tmp, index=False)
    with atomic_path(out_dir / "captions.parquet") as tmp:
        pd.DataFrame(captions, columns=["id", "caption"]).to_parquet(tmp, index=False)
    summary.images = len(rows)
    summary.named = len(captions)
    summary.skipped = dict(stats.skipped)
    summary.splits = manifest["split"].value_counts().to_dict()
    summary.seconds = round(time.perf_counter() - start, 2)
    write_json(out_dir / "meta.json", {
        "name": name, "source": ds.source.value, "resolution": data.resolution, "count": len(rows),
        "shard_size": data.shard_size, "num_shards": num_shards, "background": list(background),
        "glyph_fill": data.glyph_fill, "pairs_only": ds.pairs_only})
    return summary

