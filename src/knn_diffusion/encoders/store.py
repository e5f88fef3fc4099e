"""Embedding store: L2-normalised image embeddings in ``.npy`` shards, tied to one encoder fingerprint.

Layout of one store directory::

    emb-00000.npy     float16 | float32 (n, d), rows L2-normalised, memory-mappable
    ids-00000.npy     int64 (n,), rows into the image collection (ImageStore row ids)
    meta.json         fingerprint, dim, dtype, count, shard_size, num_shards, ids_sha256, content_sha256, encoder
    metadata.parquet  (imports only) the source's per-row metadata, in store order

``meta.json`` is written last: a directory without it is an unfinished run. While a run is in
progress, ``progress.json`` records what it is computing, so a resumed run keeps only shards that
belong to the same encoder, ids, image content and layout, and produces byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from knn_diffusion.encoders.encoder import Encoder
from knn_diffusion.io import atomic_path, read_json, save_npy, write_json

META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
METADATA_FILE = "metadata.parquet"
DTYPES = ("float16", "float32")


def emb_name(shard: int) -> str:
    return f"emb-{shard:05d}.npy"


def ids_name(shard: int) -> str:
    return f"ids-{shard:05d}.npy"


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32 rows scaled to unit length (all-zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def check_compatible(where: str, have_fingerprint: str, have_dim: int, fingerprint: str, dim: int) -> None:
    """Refuse to mix embedding spaces: name both sides of any mismatch."""
    if have_dim != dim:
        raise ValueError(f"{where}: embeddings have dim {have_dim} but the configured encoder has dim {dim} "
                         f"(fingerprints {have_fingerprint[:12]} vs {fingerprint[:12]}); re-run embed")
    if have_fingerprint != fingerprint:
        raise ValueError(f"{where}: embeddings come from encoder {have_fingerprint} but the configured encoder "
                         f"is {fingerprint}; re-run embed with the configured encoder")


@dataclass
class EmbeddingStore:
    """Read access to a finished store; shards stay memory-mapped."""

    root: Path
    meta: dict
    _emb: list[np.ndarray]
    _ids: list[np.ndarray]

    @classmethod
    def open(cls, root: str | os.PathLike) -> "EmbeddingStore":
        root = Path(root)
        if not (root / META_FILE).is_file():
            raise FileNotFoundError(f"{root / META_FILE}: not found; the embed run is missing or unfinished")
        meta = read_json(root / META_FILE)
        for key in ("fingerprint", "dim", "dtype", "count", "num_shards"):
            if key not in meta:
                raise ValueError(f"{root / META_FILE}: missing key {key!r}")
        emb = [np.load(root / emb_name(i), mmap_mode="r") for i in range(meta["num_shards"])]
        ids = [np.load(root / ids_name(i)) for i in range(meta["num_shards"])]
        count = sum(len(e) for e in emb)
        if count != meta["count"] or any(len(e) != len(i) for e, i in zip(emb, ids)):
            raise ValueError(f"{root}: shards hold {count} rows but {META_FILE} says {meta['count']}")
        return cls(root, meta, emb, ids)

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def ids(self) -> np.ndarray:
        """int64 (count,): the image-collection row of each store position."""
        return np.concatenate(self._ids) if self._ids else np.empty(0, dtype=np.int64)

    def get(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Store positions (0..len-1) -> float32 (n, dim)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"{self.root}: positions must be in [0, {len(self)})")
        shard, offset = np.divmod(positions, int(self.meta["shard_size"]))
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        for s in np.unique(shard):
            picked = shard == s
            out[picked] = self._emb[s][offset[picked]]
        return out

    def positions_of(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Image-collection rows -> store positions (they coincide for a full embed, but need not)."""
        ids = self.ids
        lookup = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
        lookup[ids] = np.arange(len(ids))
        rows = np.asarray(rows, dtype=np.int64)
        known = (rows >= 0) & (rows < len(lookup))
        found = np.full(rows.shape, -1, dtype=np.int64)
        found[known] = lookup[rows[known]]
        if (found < 0).any():
            raise ValueError(f"{self.root}: {int((found < 0).sum())} image rows have no embedding; rerun embed")
        return found

    def vectors(self, dtype: Any = np.float32) -> np.ndarray:
        """All embeddings, concatenated: (count, dim)."""
        if not self._emb:
            return np.empty((0, self.dim), dtype=dtype)
        return np.concatenate([np.asarray(e, dtype=dtype) for e in self._emb])

    def check_compatible(self, fingerprint: str, dim: int) -> None:
        check_compatible(str(self.root), self.fingerprint, self.dim, fingerprint, dim)


# ---- writing ----------------------------------------------------------------------------------


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).data).hexdigest()


def _shard_complete(root: Path, shard: int, expected_ids: np.ndarray, dim: int, dtype: str) -> bool:
    try:
        emb = np.load(root / emb_name(shard), mmap_mode="r")
        ids = np.load(root / ids_name(shard))
    except (OSError, ValueError, EOFError):
        return False
    return emb.shape == (len(expected_ids), dim) and emb.dtype == dtype and np.array_equal(ids, expected_ids)


def _remove_shards(root: Path) -> None:
    for path in root.glob("*.npy"):
        if re.fullmatch(r"(emb|ids)-\d{5}\.npy", path.name):
            path.unlink()


def begin_embedding(out_dir: str | os.PathLike, fingerprint: str, dim: int, ids: np.ndarray, shard_size: int,
                    dtype: str, encoder: dict | None = None, content: str = "") -> list[int]:
    """Prepare ``out_dir`` for a run and return the shard indices still to compute.

    A finished store of the same run needs nothing; shards of an interrupted run of the same
    (fingerprint, dim, dtype, shard_size, ids, content) are kept when they are complete; anything
    else is removed first. ``content`` is a digest of the images themselves (e.g.
    ``ImageStore.content_digest``): with a fixed pretrained encoder, re-ingested images keep their
    ids and the fingerprint, and only this tells that the old vectors are stale. Shards may then be
    computed in any order or in parallel (:func:`write_shard`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"embed dtype {dtype!r}: expected one of {list(DTYPES)}")
    if shard_size < 1:
        raise ValueError(f"embed shard_size {shard_size}: expected >= 1")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids, dtype=np.int64)
    run = {"fingerprint": fingerprint, "dim": int(dim), "dtype": dtype, "count": len(ids),
           "shard_size": int(shard_size), "num_shards": -(-len(ids) // shard_size), "ids_sha256": _ids_digest(ids),
           "content_sha256": content, "encoder": encoder or {}}
    run = json.loads(json.dumps(run, default=str))  # as it reads back from disk
    previous = None
    for name in (PROGRESS_FILE, META_FILE):
        if (root / name).is_file():
            previous = read_json(root / name)
            break
    if previous != run:
        _remove_shards(root)
    (root / META_FILE).unlink(missing_ok=True)
    write_json(root / PROGRESS_FILE, run)
    return [s for s in range(run["num_shards"])
            if not _shard_complete(root, s, ids[s * shard_size:(s + 1) * shard_size], dim, dtype)]


def write_shard(encoder: Encoder, images: Any, ids: np.ndarray, out_dir: str | os.PathLike, shard: int,
                shard_size: int, batch_size: int, dtype: str, on_batch: Callable[[int], None] | None = None) -> None:
    """Embed one shard's rows (``ids[shard*shard_size:...]``, read as ``images[ids_batch]``) and write it.

    Batches start at the shard's first row, so a shard's bytes never depend on which shards ran before.
    """
    root = Path(out_dir)
    shard_ids = np.asarray(ids, dtype=np.int64)[shard * shard_size:(shard + 1) * shard_size]
    emb = np.empty((len(shard_ids), encoder.dim), dtype=dtype)
    for start in range(0, len(shard_ids), batch_size):
        batch_ids = shard_ids[start:start + batch_size]
        emb[start:start + len(batch_ids)] = encoder.encode_images(images[batch_ids], batch_size=batch_size)
        if on_batch is not None:
            on_batch(len(batch_ids))
    save_npy(root / emb_name(shard), emb)   # embeddings first: ids are the shard's completion marker
    save_npy(root / ids_name(shard), shard_ids)


def finish_embedding(out_dir: str | os.PathLike) -> "EmbeddingStore":
    """Check every shard of the run in progress, then write ``meta.json`` (the completion marker)."""
    root = Path(out_dir)
    run = read_json(root / PROGRESS_FILE)
    ids = np.concatenate([np.load(root / ids_name(s)) for s in range(run["num_shards"])] or [np.empty(0, np.int64)])
    if len(ids) != run["count"] or _ids_digest(ids) != run["ids_sha256"]:
        raise ValueError(f"{root}: shards do not hold the {run['count']} ids this run was started with")
    write_json(root / META_FILE, run)
    (root / PROGRESS_FILE).unlink()
    return EmbeddingStore.open(root)


def embed_collection(encoder: Encoder, images: Any, ids: np.ndarray, out_dir: str | os.PathLike,
                     shard_size: int = 4096, batch_size: int = 256, dtype: str = "float16",
                     on_progress: Callable[[int, int], None] | None = None, content: str = "") -> EmbeddingStore:
    """Embed ``images[ids]`` into a store at ``out_dir``, resuming from complete shards.

    ``images`` is anything indexable by an int64 array returning uint8 (n, H, W, 3) (an ImageStore,
    a numpy array). ``on_progress(done, total)`` is called after each batch with image counts;
    ``content`` keys shard reuse on the images' content (see :func:`begin_embedding`).
    """
    ids = np.asarray(ids, dtype=np.int64)
    fingerprint = encoder.fingerprint
    pending = begin_embedding(out_dir, fingerprint, encoder.dim, ids, shard_size, dtype, encoder.description, content)
    done = len(ids) - sum(len(ids[s * shard_size:(s + 1) * shard_size]) for s in pending)
    with tqdm(total=len(ids), initial=done, desc="embed", unit="img") as bar:
        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.update(n)
            if on_progress is not None:
                on_progress(done, len(ids))
        for shard in pending:
            write_shard(encoder, images, ids, out_dir, shard, shard_size, batch_size, dtype, advance)
    return finish_embedding(out_dir)


# ---- other sources ----------------------------------------------------------------------------


def _numbered(folder: Path, pattern: str) -> list[Path]:
    """Files like img_emb_0.npy, img_emb_1.npy, ..., img_emb_10.npy in numeric order."""
    found = [(int(m.group(1)), p) for p in folder.glob("*") if (m := re.fullmatch(pattern, p.name))]
    return [p for _, p in sorted(found)]


def _concatenated_rows(parts: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the virtual concatenation of ``parts`` (memory-mapped, read lazily)."""
    pieces, offset = [], 0
    for part in parts:
        lo, hi = max(start, offset), min(stop, offset + len(part))
        if lo < hi:
            pieces.append(np.asarray(part[lo - offset:hi - offset]))
        offset += len(part)
    return np.concatenate(pieces)


def import_clip_retrieval(src_dir: str | os.PathLike, out_dir: str | os.PathLike, fingerprint: str,
                          dim: int | None = None, shard_size: int = 4096, dtype: str = "float16",
                          id_column: str | None = None, keep_metadata: bool = True) -> EmbeddingStore:
    """Convert clip-retrieval output (``img_emb/img_emb_{i}.npy`` + ``metadata/metadata_{i}.parquet``).

    ``fingerprint`` is that of the encoder that produced the embeddings (load it and read
    ``encoder.fingerprint``); ``dim``, when given, is checked. Ids are ``metadata[id_column]`` or,
    by default, the row number in clip-retrieval's order. Embeddings are streamed shard by shard
    (memory-mapped sources); rows are re-normalised. The metadata is kept as metadata.parquet.
    """
    src = Path(src_dir)
    emb_files = _numbered(src / "img_emb", r"img_emb_(\d+)\.npy")
    meta_files = _numbered(src / "metadata", r"metadata_(\d+)\.parquet")
    if not emb_files:
        raise FileNotFoundError(f"{src / 'img_emb'}: no img_emb_<i>.npy files (clip-retrieval layout expected)")
    if [p.stem.split("_")[-1] for p in emb_files] != [p.stem.split("_")[-1] for p in meta_files]:
        raise ValueError(f"{src}: img_emb files {[p.name for p in emb_files]} and metadata files "
                         f"{[p.name for p in meta_files]} do not pair up")
    parts = [np.load(p, mmap_mode="r") for p in emb_files]
    columns = [id_column] if id_column and not keep_metadata else None
    metadata = [pd.read_parquet(p, columns=columns) for p in meta_files]
    for emb_path, meta_path, part, meta in zip(emb_files, meta_files, parts, metadata):
        if part.ndim != 2 or len(part) != len(meta) or part.shape[1] != parts[0].shape[1]:
            raise ValueError(f"{emb_path}: shape {part.shape} does not match {len(meta)} rows in {meta_path} "
                             f"and width {parts[0].shape[1]}")
    width = parts[0].shape[1]
    if dim is not None and width != dim:
        check_compatible(str(src), fingerprint, width, fingerprint, dim)
    table = pd.concat(metadata, ignore_index=True)
    if id_column is None:
        ids = np.arange(len(table), dtype=np.int64)
    elif id_column not in table:
        raise ValueError(f"{src}: id_column {id_column!r} not in metadata columns {list(table.columns)}")
    else:
        ids = table[id_column].to_numpy(np.int64)
    encoder = {"kind": "clip-retrieval import", "source": str(src)}
    for shard in begin_embedding(out_dir, fingerprint, width, ids, shard_size, dtype, encoder):
        start = shard * shard_size
        vectors = normalize_rows(_concatenated_rows(parts, start, min(start + shard_size, len(ids))))
        save_npy(Path(out_dir) / emb_name(shard), vectors.astype(dtype))
        save_npy(Path(out_dir) / ids_name(shard), ids[start:start + shard_size])
    if keep_metadata:
        with atomic_path(Path(out_dir) / METADATA_FILE) as tmp:
            table.to_parquet(tmp, index=False)
    return finish_embedding(out_dir)


# ---- text embeddings --------------------------------------------------------------------------


def save_text_embeddings(encoder: Encoder, texts: Sequence[str], path: str | os.PathLike,
                         batch_size: int = 256) -> np.ndarray:
    """Embed captions into ``path`` (float32 (n, d) .npy) + ``path.with_suffix('.json')`` (texts, fingerprint)."""
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"{path}: text embeddings are written as .npy")
    texts = list(texts)
    vectors = encoder.encode_texts(texts, batch_size=batch_size) if texts else np.zeros((0, encoder.dim), np.float32)
    save_npy(path, vectors)
    write_json(path.with_suffix(".json"), {"fingerprint": encoder.fingerprint, "dim": encoder.dim,
                                           "count": len(texts), "texts": texts})
    return vectors


def load_text_embeddings(path: str | os.PathLike, fingerprint: str | None = None,
                         dim: int | None = None) -> tuple[np.ndarray, list[str]]:
    """(vectors float32 (n, d), texts); checked against the configured encoder when given."""
    path = Path(path)
    info = read_json(path.with_suffix(".json"))
    vectors = np.load(path)
    if len(vectors) != info["count"] or len(info["texts"]) != info["count"]:
        raise ValueError(f"{path}: {len(vectors)} vectors but {path.with_suffix('.json').name} lists {info['count']}")
    if fingerprint is not None:
        check_compatible(str(path), info["fingerprint"], int(info["dim"]), fingerprint,
                         int(dim if dim is not None else info["dim"]))
    return vectors, list(info["texts"])
