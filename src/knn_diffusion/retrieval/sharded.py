"""A sharded index build on Dask: train on a sample, add slices on workers, merge the inverted lists on disk.

For collections whose vectors do not fit the RAM of the process that builds the index:

1. train the coarse quantizer and the codes on a seeded sample (:func:`~.index.train_index`, here);
2. each Dask task (a LocalCluster of ``workers`` processes, or the scheduler at ``address``: the
   ``embed.dask_address`` cluster) reads the trained empty index, adds its slice of the vectors, read
   ``batch`` rows at a time from the memory-mapped embedding store, and writes a shard index file; a
   worker never holds more than one batch of vectors plus its shard's codes;
3. faiss's :class:`OnDiskInvertedLists` merges the shards' lists (themselves memory-mapped) into one
   ``index.ivfdata`` file, list by list, in shard order: the same lists, in the same order, as adding
   every vector in one process to the same trained index, hence the same neighbours and distances;
4. the index is searched with its lists memory-mapped (``load_index`` opens them read-only).

What differs from the one-process default (``choose_factory``): on-disk lists need a fixed code size, so
fast-scan PQ (4-bit codes packed in blocks of 32) becomes plain 4-bit PQ of the same size, scanned
without SIMD lookup tables; and the ``Refine(SQfp16)`` store is dropped: the inverted file keeps the
content ids itself and ``Searcher`` re-ranks against the memory-mapped embedding store (the path every
non-Refine index takes). The served backend's export refuses such an index (it needs an id map).
Workers and the merge need the store and the output directory on a filesystem they share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import faiss
import numpy as np

from knn_diffusion.io import atomic_dir, content_sha256, write_json
from knn_diffusion.retrieval.build import tuned_sidecar
from knn_diffusion.retrieval.config import IndexConfig
from knn_diffusion.retrieval.index import (
    INDEX_FILE,
    METRIC,
    SIDECAR_FILE,
    BuildInfo,
    choose_factory,
    train_index,
    without_prefetch_threads,
)
from knn_diffusion.retrieval.search import VectorGetter

if TYPE_CHECKING:  # a runtime import would load torch into every worker (encoders.store -> encoder)
    from knn_diffusion.encoders.store import EmbeddingStore

log = logging.getLogger(__name__)
IVFDATA_FILE = "index.ivfdata"
SHARD_ROWS = 1_000_000  # at most this many vectors per task: a task holds its shard's codes and ids until written


def sharded_factory(factory: str) -> str | None:
    """The factory a sharded build uses for ``factory``, or None when it has no inverted file to shard.

    Drops a trailing ``Refine(...)`` (the re-rank reads the embedding store instead) and turns fast-scan
    PQ (``PQ<m>x4fs``) into plain 4-bit PQ of the same code size: on-disk lists need fixed-size codes.
    """
    if not re.match(r"^(\w+,)?IVF", factory):
        return None
    out = re.sub(r",Refine\(.*\)$", "", factory)
    return re.sub(r"(PQ\d+x4)fsr?(_\d+)?", r"\1", out)


# ----------------------------------------------------------------------------------------------
# Reading rows of the memory-mapped store


def read_rows(files: Sequence[str], rows_per_file: int, positions: np.ndarray) -> np.ndarray:
    """float32 (len(positions), d): row p is row ``p % rows_per_file`` of ``files[p // rows_per_file]``.

    Each file is mapped only while its rows are copied: pages of a mapping count in a process's RSS
    (what Dask's memory limit watches) until it is unmapped, and the page cache keeps them anyway.
    """
    positions = np.asarray(positions, dtype=np.int64)
    file_no, offset = np.divmod(positions, rows_per_file)
    out = None
    for f in np.unique(file_no):
        picked = np.flatnonzero(file_no == f)
        rows = np.load(files[f], mmap_mode="r")
        if out is None:
            out = np.empty((len(positions), rows.shape[1]), np.float32)
        out[picked] = rows[offset[picked]]
        del rows
    return out if out is not None else np.empty((0, 0), np.float32)


class StoreRows:
    """Rows ``positions`` of a store's ``.npy`` files, read on demand: a stand-in for an (N, d) array
    (``shape``, ``len``, slices and position arrays) that never loads the whole store."""

    def __init__(self, files: Sequence[str | os.PathLike], rows_per_file: int, positions: np.ndarray, d: int):
        self.files = [str(Path(f).resolve()) for f in files]  # workers may run in another directory
        self.rows_per_file, self.d = int(rows_per_file), int(d)
        self.positions = np.asarray(positions, dtype=np.int64)

    @classmethod
    def of_store(cls, store: "EmbeddingStore", positions: np.ndarray | None = None) -> "StoreRows":
        from knn_diffusion.encoders.store import emb_name

        files = [store.root / emb_name(i) for i in range(int(store.meta["num_shards"]))]
        positions = np.arange(len(store)) if positions is None else positions
        return cls(files, int(store.meta["shard_size"]), positions, store.dim)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.positions), self.d

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key) -> np.ndarray:
        return read_rows(self.files, self.rows_per_file, self.positions[key])


# ----------------------------------------------------------------------------------------------
# On the workers


def peak_rss() -> int:
    """This process's peak resident set size in bytes: Linux's VmHWM, which counts from the process's exec
    (``ru_maxrss`` also keeps the peak of the parent a spawned worker was forked from), else ``ru_maxrss``."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def add_shard(work_dir: str, files: list[str], rows_per_file: int, lo: int, hi: int, batch: int) -> str:
    """A Dask task: add rows [lo, hi) of the build (``positions.npy`` / ``ids.npy`` in ``work_dir``) to a
    copy of ``trained.faiss``, ``batch`` rows at a time; write and return its shard file."""
    work = Path(work_dir)
    index = faiss.read_index(str(work / "trained.faiss"))
    positions = np.array(np.load(work / "positions.npy", mmap_mode="r")[lo:hi])
    ids = np.array(np.load(work / "ids.npy", mmap_mode="r")[lo:hi])
    for start in range(0, hi - lo, batch):
        block = read_rows(files, rows_per_file, positions[start:start + batch])
        faiss.normalize_L2(block)
        index.add_with_ids(block, ids[start:start + len(block)])
        del block
    out = work / f"shard-{lo:012d}.faiss"
    faiss.write_index(index, str(out))
    return str(out)


@contextlib.contextmanager
def dask_client(workers: int, address: str = "", memory_limit: str | int = "auto") -> Iterator[Any]:
    """A client of the scheduler at ``address``, or of a LocalCluster of ``workers`` single-threaded
    processes of ``memory_limit`` each (Dask's nanny restarts a worker that passes 95% of it)."""
    from dask.distributed import Client, LocalCluster

    cluster = None if address else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                dashboard_address=None, memory_limit=memory_limit)
    try:
        with Client(address or cluster) as client:
            yield client
    finally:
        if cluster is not None:
            cluster.close()


def add_shards(client: Any, rows: StoreRows, ids: np.ndarray, work_dir: Path, *, n_shards: int, batch: int
               ) -> tuple[list[str], dict[str, Any]]:
    """Shard files (in order) of ``work_dir``'s ``trained.faiss`` over rows [0, N) cut in ``n_shards``
    contiguous slices; and the workers' report: peak RSS in bytes by worker address, and how many of the
    workers there at the start were gone or restarted (memory limit) at the end."""
    np.save(work_dir / "positions.npy", rows.positions)
    np.save(work_dir / "ids.npy", np.asarray(ids, dtype=np.int64))
    bounds = np.linspace(0, len(rows), n_shards + 1).astype(int)
    before = client.run(os.getpid)
    futures = [client.submit(add_shard, str(work_dir), rows.files, rows.rows_per_file, int(lo), int(hi), batch,
                             pure=False, retries=1) for lo, hi in zip(bounds[:-1], bounds[1:])]
    paths = client.gather(futures)
    after = client.run(os.getpid)
    return paths, {"peak_rss_bytes": client.run(peak_rss),
                   "restarted_workers": sum(after.get(addr) != pid for addr, pid in before.items())}


# ----------------------------------------------------------------------------------------------
# Merging on disk


def merge_on_disk(trained_path: str | os.PathLike, shard_paths: Sequence[str], ivfdata: str | os.PathLike
                  ) -> faiss.Index:
    """The trained index of ``trained_path`` holding the lists of every shard, in order, in ``ivfdata``.

    faiss's ``contrib.ondisk.merge_ondisk`` does the same but leaves each shard's lists mapped for the
    life of the process (it disowns them); here they are unmapped once merged. The returned index names
    its data file by its base name only: ``load_index`` finds it beside ``index.faiss``.
    """
    index = faiss.read_index(str(trained_path))
    ivf = faiss.extract_index_ivf(index)
    if index.ntotal != 0:
        raise ValueError(f"{trained_path}: the trained index already holds {index.ntotal} vectors")
    shards = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in shard_paths]  # lists mapped, not read
    lists = faiss.InvertedListsPtrVector()
    for shard in shards:
        lists.push_back(faiss.extract_index_ivf(shard).invlists)
    on_disk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    ntotal = on_disk.merge_from_multiple(lists.data(), lists.size(), False)
    del lists, shards
    ivf.replace_invlists(on_disk, True)
    on_disk.this.disown()  # the index owns it now
    index.ntotal = ivf.ntotal = ntotal
    faiss.downcast_InvertedLists(ivf.invlists).filename = Path(ivfdata).name
    return without_prefetch_threads(index)


# ----------------------------------------------------------------------------------------------
# The build


def file_facts(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": content_sha256(path)}


def build_sharded_index(rows: StoreRows, ids: np.ndarray, config: IndexConfig, fingerprint: str,
                        directory: str | os.PathLike, *, workers: int = 2, address: str = "",
                        memory_limit: str | int = "auto", batch: int | None = None, shard_rows: int = SHARD_ROWS,
                        get_vectors: VectorGetter | None = None, tune: bool = True,
                        **sidecar_extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build ``config``'s index over ``rows`` (a :class:`StoreRows`) with content ``ids`` on Dask, tune it like
    ``build_tuned_index`` (``tune=False``: not tuned, ``recall`` None) and save it to ``directory`` (``index.faiss``,
    ``index.ivfdata``, ``index.json``); returns (sidecar, report: build seconds, shards, peak RSS per worker).

    ``batch`` rows (default ``config.add_batch``) are read at a time on a worker: batch x d x 4 bytes.
    ``get_vectors`` (content ids -> embeddings, for the re-rank) defaults to reading ``rows``. The report's
    ``peak_rss_bytes`` is each worker process's peak RSS (:func:`peak_rss`), by worker address.
    """
    n, d = rows.shape
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != (n,) or len(np.unique(ids)) != n:
        raise ValueError(f"build_sharded_index: need {n} unique ids, got shape {ids.shape}")
    factory = choose_factory(n, d, config.bytes_per_vector) if config.factory == "auto" else config.factory
    on_disk = sharded_factory(factory)
    if on_disk is None:
        raise ValueError(f"index factory {factory!r}: a sharded build needs an inverted file (IVF...)")
    start = time.perf_counter()
    trained, _, device = train_index(rows, on_disk, train_size=config.train_size, seed=config.seed,
                                     use_gpu=config.use_gpu, bytes_per_vector=config.bytes_per_vector)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(trained).invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists):
        raise ValueError(f"index factory {on_disk!r}: its {type(lists).__name__} cannot be merged on disk "
                         "(needs fixed-size codes: IVF with PQ, SQ or Flat)")
    n_shards = max(workers, -(-n // shard_rows))
    with atomic_dir(directory) as tmp:
        work = (tmp / "shards").resolve()
        work.mkdir()
        faiss.write_index(trained, str(work / "trained.faiss"))
        del trained
        with dask_client(workers, address, memory_limit) as client:
            log.info("adding %d vectors in %d shards on %s", n, n_shards, client)
            shard_paths, workers_report = add_shards(client, rows, ids, work, n_shards=n_shards,
                                                     batch=batch or config.add_batch)
        index = merge_on_disk(work / "trained.faiss", shard_paths, tmp / IVFDATA_FILE)
        shutil.rmtree(work)
        info = BuildInfo(factory=on_disk, n=n, d=d, device=device, build_seconds=round(time.perf_counter() - start, 3))
        extra = {**sidecar_extra, "requested_factory": factory}
        if tune:
            sidecar = tuned_sidecar(index, info, rows, ids, config, fingerprint, get_vectors=get_vectors, **extra)
        else:  # untuned: faiss's default nprobe, the widest re-rank
            sidecar = {**{k: v for k, v in asdict(info).items() if k != "build_seconds"}, "fingerprint": fingerprint,
                       "search_params": {}, "recall": None, "rerank_factor": config.rerank_factor,
                       "seed": config.seed, **extra}
        faiss.write_index(index, str(tmp / INDEX_FILE))
        del index  # unmaps the lists before the directory moves into place
        meta = {**sidecar, "ntotal": n, "d": d, "metric": METRIC, **file_facts(tmp / INDEX_FILE),
                "ivfdata": {"file": IVFDATA_FILE, **file_facts(tmp / IVFDATA_FILE)}}
        write_json(tmp / SIDECAR_FILE, meta)
    report = {"build_seconds": info.build_seconds, "shards": n_shards, **workers_report, "memory_limit": memory_limit}
    return meta, report
