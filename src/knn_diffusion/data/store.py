"""On-disk image collection written by ``ingest``: uint8 ``.npy`` shards + a manifest + a captions file.

Layout of one dataset directory::

    images-00000.npy   uint8 (n, R, R, 3), memory-mappable
    manifest.parquet   row, id, source, origin, content_hash, split, shard, offset
    captions.parquet   id, caption   (kept apart: generator training never opens it)
    meta.json          resolution, count, shard_size, source, background

``row`` is the position in the collection (0..N-1); FAISS indexes and neighbour tables use it as the id.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from knn_diffusion.io import read_json

SPLITS = ("train", "val", "test")


def shard_name(index: int) -> str:
    return f"images-{index:05d}.npy"


@dataclass
class ImageStore:
    """Random access to an ingested collection without loading it into RAM."""

    root: Path
    manifest: pd.DataFrame
    meta: dict
    _shards: list[np.ndarray]

    @classmethod
    def open(cls, root: str | os.PathLike) -> "ImageStore":
        root = Path(root)
        manifest_path = root / "manifest.parquet"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no manifest; run the ingest stage first")
        manifest = pd.read_parquet(manifest_path)
        meta = read_json(root / "meta.json")
        shards = [np.load(root / shard_name(i), mmap_mode="r") for i in range(meta["num_shards"])]
        count = sum(len(s) for s in shards)
        if count != len(manifest):
            raise ValueError(f"{root}: shards hold {count} images but the manifest lists {len(manifest)}")
        return cls(root, manifest, meta, shards)

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def shard_size(self) -> int:
        return int(self.meta["shard_size"])

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, rows) -> np.ndarray:
        """One row -> (R, R, 3); an int array of rows -> (n, R, R, 3). uint8."""
        if np.isscalar(rows):
            row = int(rows)
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} out of range for {len(self)} images in {self.root}")
            return np.asarray(self._shards[row // self.shard_size][row % self.shard_size])
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.resolution, self.resolution, 3), dtype=np.uint8)
        for i, row in enumerate(rows):
            out[i] = self[int(row)]
        return out

    def rows(self, split: str | None = None) -> np.ndarray:
        """Row ids of one split (or all rows)."""
        if split is None:
            return self.manifest["row"].to_numpy(np.int64)
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {list(SPLITS)}")
        return self.manifest.loc[self.manifest["split"] == split, "row"].to_numpy(np.int64)

    def content_digest(self, rows: np.ndarray) -> str:
        """sha256 over the pixel content hashes of ``rows``, in order: what derived data (embeddings) is of.

        Re-ingesting at another resolution or background keeps the row ids but changes this.
        """
        hashes = self.manifest.set_index("row")["content_hash"].loc[np.asarray(rows, dtype=np.int64)]
        return hashlib.sha256("\n".join(hashes).encode()).hexdigest()

    def subset(self, rows: np.ndarray) -> "RowSubset":
        """A view whose item i is row ``rows[i]`` (e.g. the train split, for a torch Dataset)."""
        return RowSubset(self, np.asarray(rows, dtype=np.int64))

    def read_captions(self) -> pd.Series:
        """Names/captions by row. Only encoder alignment and evaluation may call this."""
        captions = pd.read_parquet(self.root / "captions.parquet")
        by_id = dict(zip(captions["id"], captions["caption"]))
        return pd.Series([by_id.get(i) for i in self.manifest["id"]], index=self.manifest["row"], dtype=object)


@dataclass
class RowSubset:
    """Indexable like an ImageStore, over a selection of its rows."""

    store: ImageStore
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        return self.store[self.rows[index]]
