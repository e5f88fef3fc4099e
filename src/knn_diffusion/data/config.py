"""Params section of the ``ingest`` stage: the image collections and how they are normalised and split."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from knn_diffusion.config_fields import between


class Source(str, Enum):
    openmoji = "openmoji"
    noto = "noto"
    folder = "folder"
    webdataset = "webdataset"
    iconify = "iconify"  # an Iconify icons.json of emoji SVGs (npm @iconify-json/*)


@dataclass
class DatasetConfig:
    """One image collection; ``path`` is required for ``folder``, ``webdataset`` and ``iconify`` sources."""

    source: Source = Source.openmoji
    path: str | None = None
    limit: int | None = field(default=None, metadata=between(1))
    # A font/package that is not installed skips the dataset with a warning instead of failing.
    optional: bool = False
    # (image, name) pairs for the encoders only (encoder.alignment.datasets, judge.alignment.datasets):
    # ingested, never embedded or indexed.
    pairs_only: bool = False


@dataclass
class SplitConfig:
    val: float = field(default=0.05, metadata=between(0, 0.5))
    test: float = field(default=0.10, metadata=between(0, 0.5))


@dataclass
class DataConfig:
    resolution: int = field(default=32, metadata=between(8, 1024))
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    shard_size: int = field(default=4096, metadata=between(1))
    # Emoji glyphs fill this fraction of the square after cropping to their bbox.
    glyph_fill: float = field(default=0.9, metadata=between(0.1, 1.0))
    split: SplitConfig = field(default_factory=SplitConfig)
    datasets: dict[str, DatasetConfig] = field(default_factory=lambda: {
        "openmoji": DatasetConfig(source=Source.openmoji),
        "noto": DatasetConfig(source=Source.noto, optional=True),
    })
    # The image-only collection the generator trains on; its captions are never read in training.
    generator_dataset: str = "openmoji"
