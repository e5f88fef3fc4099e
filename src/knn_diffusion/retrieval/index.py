"""Build, tune, save and load the FAISS index over image embeddings.

Cosine similarity is inner product on L2-normalised vectors, so every index uses ``METRIC_INNER_PRODUCT``
and every vector is (re-)normalised on the way in. Ids are the image ids of the embedding store.

An index is saved as a directory holding ``index.faiss`` and ``index.json`` (the sidecar: factory,
size, encoder fingerprint, tuned search parameters, measured recall, device and the
sha256 of the index bytes). The sidecar is checked before faiss reads a byte, so a truncated or
foreign file becomes a ``ValueError`` that names it instead of a crash inside faiss.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from knn_diffusion.io import atomic_dir, content_sha256, read_json, write_json
from knn_diffusion.retrieval.config import GpuUse

INDEX_FILE = "index.faiss"
SIDECAR_FILE = "index.json"
METRIC = "inner_product"  # on L2-normalised vectors = cosine similarity

# Below this many vectors exact search is fast enough (a few ms per query) and has recall 1.
FLAT_MAX_VECTORS = 50_000
# From this many inverted lists on, a flat coarse quantizer costs more than the list scan; use HNSW.
HNSW_QUANTIZER_MIN_LISTS = 16_384
# The exact re-rank store of large indexes: float16 copies of the (unit) vectors, memory-mapped on load.
RERANK_STORE = "Refine(SQfp16)"
# PQ codes of at most d / 4 bytes (4 bits per 2 dims): measured no slower to reach recall 0.95 with the
# re-rank than d / 2 bytes, and half the RAM (docs/benchmarks.md, Retrieval).
CODE_BYTES_PER_DIM_DIVISOR = 4


def choose_factory(n: int, d: int, bytes_per_vector: int = 256) -> str:
    """Pick a faiss factory string for ``n`` vectors of dimension ``d`` within a code-size budget.

    Small collections, or budgets that hold the raw float32 vector, get exact ``Flat``. Large ones get
    an inverted file with about sqrt(n) lists (k-means cost on 2 cores is what limits build time),
    4-bit fast-scan PQ codes of at most ``bytes_per_vector`` (and at most ``d / 4`` bytes: finer codes
    only slow the scan once the re-rank does the precision), and ``Refine(SQfp16)``: faiss re-scores
    ``k * k_factor`` candidates against a float16 copy of every vector, which ``load_index``
    memory-maps (page cache, not index RAM). See docs/benchmarks.md for the measurements behind it.
    """
    if n < 1 or d < 1:
        raise ValueError(f"choose_factory: need n >= 1 and d >= 1, got n={n}, d={d}")
    if n <= FLAT_MAX_VECTORS or bytes_per_vector >= 4 * d:
        return "Flat"
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_MIN_LISTS else f"IVF{nlist}"
    # Fast-scan PQ: M sub-quantizers of 4 bits each -> M / 2 bytes; M must divide d.
    code_bytes = min(bytes_per_vector, d // CODE_BYTES_PER_DIM_DIVISOR)
    m = max(m for m in range(1, min(d, 2 * max(code_bytes, 1)) + 1) if d % m == 0)
    return f"{coarse},PQ{m}x4fs,{RERANK_STORE}"


def refine_of(index: faiss.Index) -> faiss.IndexRefine | None:
    """The ``IndexRefine`` inside ``index`` (directly or under an ``IndexIDMap``), else None."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexRefine) else None


# ----------------------------------------------------------------------------------------------
# Building


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _resolve_device(use_gpu: GpuUse | str) -> str:
    use_gpu = GpuUse(use_gpu)
    if use_gpu is GpuUse.always and not gpu_available():
        reason = ("this faiss build has no GPU support (install faiss-gpu)"
                  if not hasattr(faiss, "StandardGpuResources") else "no GPU is visible")
        raise RuntimeError(f"index.use_gpu='always' but {reason}")
    return "cuda:0" if use_gpu is not GpuUse.never and gpu_available() else "cpu"


def normalised(batch: np.ndarray) -> np.ndarray:
    """float32 C-contiguous copy with unit rows (float16 stores lose exact normalisation)."""
    out = np.ascontiguousarray(batch, dtype=np.float32).copy()
    faiss.normalize_L2(out)
    return out


@dataclass
class BuildInfo:
    factory: str
    n: int
    d: int
    device: str
    build_seconds: float
    metric: str = METRIC


def train_index(vectors: np.ndarray, factory: str = "auto", *, train_size: int = 100_000, seed: int = 0,
                use_gpu: GpuUse | str = GpuUse.auto, bytes_per_vector: int = 256) -> tuple[faiss.Index, str, str]:
    """(the trained, empty index of ``factory``, the factory string, the device) for ``vectors`` (N, d).

    ``'auto'`` resolves with :func:`choose_factory`. Training reads a seeded sample of at most ``train_size``
    rows (``vectors[sorted positions]``: an array, a memory map or any row reader with ``shape``). On a GPU
    (faiss-gpu and a visible device) the k-means of the coarse quantizer runs there; the index itself stays
    a CPU index so it saves and memory-maps like any other.
    """
    n, d = vectors.shape
    factory = choose_factory(n, d, bytes_per_vector) if factory == "auto" else factory
    device = _resolve_device(use_gpu)
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"index factory {factory!r} is not valid for d={d}: "
                         f"{str(err).splitlines()[0]}") from None
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(train_size, n), replace=False))
        ivf = faiss.try_extract_index_ivf(index)
        if device != "cpu" and ivf is not None:
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(d))
        index.train(normalised(vectors[sample]))
        if ivf is not None:
            ivf.clustering_index = None
    return index, factory, device


def build_index(vectors: np.ndarray, ids: np.ndarray, factory: str = "auto", *,
                train_size: int = 100_000, seed: int = 0, batch: int = 65_536,
                use_gpu: GpuUse | str = GpuUse.auto, bytes_per_vector: int = 256,
                progress: bool = True) -> tuple[faiss.Index, BuildInfo]:
    """Train on a seeded sample of ``vectors`` (N, d) (:func:`train_index`) and add them all with their
    int64 ``ids``. ``vectors`` may be a memory map; it is read in ``batch``-row slices.
    """
    n, d = vectors.shape
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != (n,):
        raise ValueError(f"build_index: ids has shape {ids.shape}, expected ({n},) to match vectors")
    if len(np.unique(ids)) != n:
        raise ValueError("build_index: ids are not unique")
    start = time.perf_counter()
    index, factory, device = train_index(vectors, factory, train_size=train_size, seed=seed, use_gpu=use_gpu,
                                         bytes_per_vector=bytes_per_vector)
    if faiss.try_extract_index_ivf(index) is None or refine_of(index) is not None:
        index = faiss.IndexIDMap(index)  # only bare inverted files store ids themselves

    for lo in tqdm(range(0, n, batch), desc=f"add {factory}", unit="batch", disable=not progress):
        index.add_with_ids(normalised(vectors[lo:lo + batch]), ids[lo:lo + batch])
    info = BuildInfo(factory=factory, n=n, d=d, device=device,
                     build_seconds=round(time.perf_counter() - start, 3))
    return index, info


# ----------------------------------------------------------------------------------------------
# Memory accounting


def index_bytes_per_vector(index: faiss.Index) -> dict[str, float]:
    """RAM per vector from the index internals: codes + stored ids, the re-rank store, and everything
    serialised.

    ``codes_and_ids``: for an inverted file, the bytes its lists hold (fast-scan lists pad each list
    to a block of 32 codes) plus 8 bytes per id, plus 8 more for an ``IndexIDMap``'s id table; for a
    flat/IDMap index, ``code_size`` + 8. ``rerank_store``: the refine store's code size (memory-mapped
    by ``load_index``: page cache, reported apart). ``serialised``: the whole index file / ``ntotal``.
    """
    ntotal = max(index.ntotal, 1)
    top = faiss.downcast_index(index)
    id_table = 8 if isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2)) else 0
    refine = refine_of(index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        invlists = ivf.invlists
        block = faiss.downcast_InvertedLists(invlists)
        if isinstance(block, faiss.BlockInvertedLists):
            code_bytes = sum(math.ceil(block.list_size(i) / block.n_per_block) * block.block_size
                             for i in range(block.nlist))
        else:
            code_bytes = ivf.ntotal * invlists.code_size
        codes_and_ids = (code_bytes + 8 * ivf.ntotal) / ntotal + id_table
    else:
        inner = faiss.downcast_index(top.index) if id_table else top
        codes_and_ids = getattr(inner, "code_size", 4 * index.d) + 8
    rerank_store = faiss.downcast_index(refine.refine_index).code_size if refine is not None else 0
    serialised = faiss.serialize_index(index).nbytes / ntotal
    return {"codes_and_ids": round(codes_and_ids, 2), "rerank_store": rerank_store,
            "serialised": round(serialised, 2)}


# ----------------------------------------------------------------------------------------------
# Saving and loading


def save_index(index: faiss.Index, directory: str | os.PathLike, sidecar: dict[str, Any]) -> dict:
    """Atomically write ``directory``/{index.faiss, index.json}; returns the sidecar written.

    ``sidecar`` should carry at least ``fingerprint`` (of the encoder) plus whatever build/tuning
    facts the caller has (``BuildInfo`` fields, ``search_params``, ``recall``); size, dim and the
    checksum are filled in here.
    """
    with atomic_dir(directory) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        meta = {**sidecar, "ntotal": int(index.ntotal), "d": int(index.d), "metric": METRIC,
                "bytes": (tmp / INDEX_FILE).stat().st_size, "sha256": content_sha256(tmp / INDEX_FILE)}
        write_json(tmp / SIDECAR_FILE, meta)
    return meta


def index_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(index file, sidecar) for an index directory or the ``index.faiss`` inside it."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    return directory / INDEX_FILE, directory / SIDECAR_FILE


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    _, sidecar_path = index_paths(path)
    if not sidecar_path.is_file():
        raise ValueError(f"{sidecar_path}: index sidecar not found (is {path} an index directory "
                         "written by save_index?)")
    meta = read_json(sidecar_path)
    missing = {"d", "ntotal", "bytes", "sha256", "fingerprint"} - set(meta)
    if missing:
        raise ValueError(f"{sidecar_path}: sidecar lacks keys {sorted(missing)}")
    return meta


def check_file(path: Path, facts: dict[str, Any], verify_checksum: bool = True) -> None:
    """Refuse a file missing or differing from the ``bytes`` / ``sha256`` its sidecar records."""
    if not path.is_file():
        raise ValueError(f"{path}: not found, but the index sidecar names it; rebuild the index")
    if path.stat().st_size != facts["bytes"]:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, but the index sidecar records {facts['bytes']} "
                         "(truncated or replaced); rebuild the index")
    if verify_checksum and content_sha256(path) != facts["sha256"]:
        raise ValueError(f"{path}: sha256 differs from the index sidecar (corrupt); rebuild the index")


def load_index(path: str | os.PathLike, expected_fingerprint: str | None = None,
               expected_dim: int | None = None, *, mmap: bool = True,
               verify_checksum: bool = True) -> tuple[faiss.Index, dict[str, Any]]:
    """Load an index saved by :func:`save_index`; returns (index, sidecar).

    Refuses an index built with another encoder (fingerprint) or dimension, and a file whose size or
    sha256 differs from its sidecar, before faiss parses it. ``mmap`` maps the codes instead of
    reading them (faiss falls back to reading for types it cannot map). An index whose sidecar names an
    ``ivfdata`` file (``retrieval/sharded.py``: on-disk inverted lists) is opened with its lists
    memory-mapped read-only from that file, which is checked the same way.
    """
    index_path, sidecar_path = index_paths(path)
    meta = read_sidecar(path)
    if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
        raise ValueError(f"{index_path}: built from encoder fingerprint {meta['fingerprint']!r}, "
                         f"but the embeddings in use have {expected_fingerprint!r}; rebuild the index "
                         "or point to one built with this encoder")
    if expected_dim is not None and meta["d"] != expected_dim:
        raise ValueError(f"{index_path}: holds {meta['d']}-d vectors, expected {expected_dim}-d")
    if not index_path.is_file():
        raise ValueError(f"{index_path}: index file not found next to {sidecar_path}")
    size = index_path.stat().st_size
    if size != meta["bytes"]:
        raise ValueError(f"{index_path}: {size} bytes, but its sidecar records {meta['bytes']} "
                         "(truncated or replaced); rebuild the index")
    if verify_checksum and content_sha256(index_path) != meta["sha256"]:
        raise ValueError(f"{index_path}: sha256 differs from its sidecar (corrupt); rebuild the index")
    flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
    if meta.get("ivfdata"):  # a sharded build: its inverted lists live in their own file, always memory-mapped
        check_file(index_path.parent / Path(meta["ivfdata"]["file"]).name, meta["ivfdata"], verify_checksum)
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    try:
        index = faiss.read_index(str(index_path), flags)
    except RuntimeError as err:
        raise ValueError(f"{index_path}: faiss cannot read it: {str(err).splitlines()[0]}") from None
    if index.d != meta["d"] or index.ntotal != meta["ntotal"]:
        raise ValueError(f"{index_path}: holds {index.ntotal} x {index.d}, sidecar says "
                         f"{meta['ntotal']} x {meta['d']}")
    return (without_prefetch_threads(index) if meta.get("ivfdata") else index), meta


def without_prefetch_threads(index: faiss.Index) -> faiss.Index:
    """``index`` with on-disk lists that scan straight from the mapping: faiss otherwise starts 32 threads per
    search call to touch the probed lists first, which only helps lists not yet in the page cache."""
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if isinstance(lists, faiss.OnDiskInvertedLists):
        lists.prefetch_nthread = 0
    return index


def sidecar_from(info: BuildInfo, fingerprint: str, search_params: dict[str, int], recall: float,
                 target_recall: float, k: int, rerank_factor: int, **extra: Any) -> dict[str, Any]:
    """The sidecar fields every saved index carries (``save_index`` adds size and checksum).

    Only facts that a rebuild of the same inputs reproduces: the build time goes to metrics, so a
    rebuilt index is byte-identical and DVC sees the same hash (no needless retraining downstream).
    """
    facts = {k: v for k, v in asdict(info).items() if k != "build_seconds"}
    return {**facts, "fingerprint": fingerprint, "search_params": search_params,
            "recall": {f"{k}-recall@{k}": round(recall, 4), "target": target_recall,
                       "reached": recall >= target_recall},
            "rerank_factor": rerank_factor, **extra}
