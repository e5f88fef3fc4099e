"""Benchmark the sharded index build (``retrieval/sharded.py``) on vectors that do not fit one Dask worker.

Data: ``knn_diffusion.retrieval.synthetic`` clustered unit vectors, written once as a float32 embedding
store (``emb-*.npy`` / ``ids-*.npy`` / ``meta.json``) under --workdir and memory-mapped from there. The
build trains on --train-size rows in this process, adds slices on a LocalCluster of --workers processes
whose Dask ``memory_limit`` (--memory-limit) is below the total vector bytes, and merges the lists on
disk. Reported: each worker's peak RSS (VmHWM of the worker process, read after the build), the
memory limit, the total vector bytes, the build's wall time (train + add + merge) and the whole run's,
whether any worker was restarted (the nanny restarts a worker that passes 95% of its limit), this
process's peak RSS during the build (training, merge) and during the searches, and
10-recall@10 against exact (Flat) search on held-out queries: tuned on one half, measured on the other,
with the re-rank against the memory-mapped store, and the batch QPS of both on this machine.

    python benchmarks/bench_sharded_build.py                           # 400,000 x 512, 2 workers of 300 MB
    python benchmarks/bench_sharded_build.py --n 50000 --memory-limit 400MB   # quick
"""

from __future__ import annotations

# Only light imports up here: Dask's spawned workers import this script again (as __mp_main__).
import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

K = 10
MB = 1e6


def reset_peak_rss() -> None:
    """Restart this process's VmHWM (Linux >= 4.0), so the next ``peak_rss`` covers one phase."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def write_store(args) -> Path:
    """The synthetic vectors as a float32 embedding store under --workdir (written once, reused)."""
    from knn_diffusion.encoders.store import begin_embedding, emb_name, finish_embedding, ids_name
    from knn_diffusion.io import save_npy
    from knn_diffusion.retrieval.synthetic import DATABASE, clustered_blocks

    root = Path(args.workdir) / f"store-{args.n}x{args.d}-c{args.clusters}-s{args.noise}-{args.seed}"
    if (root / "meta.json").is_file():
        return root
    ids = np.arange(args.n, dtype=np.int64)
    pending = set(begin_embedding(root, "synthetic", args.d, ids, args.store_shard, "float32"))
    rows, lo = np.empty((0, args.d), np.float32), 0
    blocks = clustered_blocks(args.n, args.d, n_clusters=args.clusters, noise=args.noise, seed=args.seed,
                              stream=DATABASE)
    for shard in range(-(-args.n // args.store_shard)):
        hi = min(lo + args.store_shard, args.n)
        while len(rows) < hi - lo:
            rows = np.concatenate([rows, next(blocks)])
        if shard in pending:
            save_npy(root / emb_name(shard), rows[:hi - lo])
            save_npy(root / ids_name(shard), ids[lo:hi])
        rows, lo = rows[hi - lo:], hi
    finish_embedding(root)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=2_000)
    parser.add_argument("--noise", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="300MB", help="Dask memory_limit of each worker")
    parser.add_argument("--factory", default="auto", help="index.factory (auto: choose_factory's)")
    parser.add_argument("--train-size", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=4_096, help="rows a worker reads and adds at a time")
    parser.add_argument("--store-shard", type=int, default=16_384, help="rows per .npy file of the store")
    parser.add_argument("--queries", type=int, default=500, help="held-out queries per half (tune, measure)")
    parser.add_argument("--rerank-factor", type=int, default=40)
    parser.add_argument("--workdir", default="/tmp/bench-sharded")
    parser.add_argument("--out", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    import faiss
    from dask.utils import parse_bytes

    from knn_diffusion.encoders.store import EmbeddingStore
    from knn_diffusion.retrieval.config import IndexConfig
    from knn_diffusion.retrieval.search import (
        Searcher,
        exact_neighbours,
        recall_at_k,
        tune_search_params,
        vectors_by_id,
    )
    from knn_diffusion.retrieval.sharded import StoreRows, build_sharded_index, peak_rss
    from knn_diffusion.retrieval.synthetic import QUERIES, clustered_vectors

    t0 = time.perf_counter()
    store = EmbeddingStore.open(write_store(args))
    rows, ids = StoreRows.of_store(store), store.ids
    vector_bytes = args.n * args.d * 4
    limit = parse_bytes(args.memory_limit)
    print(f"{args.n} x {args.d} float32 = {vector_bytes / MB:.1f} MB of vectors; {args.workers} workers of "
          f"{limit / MB:.0f} MB (memory_limit); store ready in {time.perf_counter() - t0:.1f} s", flush=True)

    config = IndexConfig(factory=args.factory, train_size=args.train_size, rerank_factor=args.rerank_factor,
                         use_gpu="never")
    out_dir = Path(args.workdir) / "index"
    reset_peak_rss()
    start = time.perf_counter()
    sidecar, report = build_sharded_index(rows, ids, config, "synthetic", out_dir, workers=args.workers,
                                          memory_limit=args.memory_limit, batch=args.batch, tune=False)
    build_wall = time.perf_counter() - start
    driver_build_peak = peak_rss()
    reset_peak_rss()
    peaks = {addr: round(v / MB, 1) for addr, v in report["peak_rss_bytes"].items()}
    print(f"built {sidecar['factory']} (asked: {sidecar['requested_factory']}) in {build_wall:.1f} s wall "
          f"({report['shards']} shards); peak RSS per worker (MB): {peaks}; restarted workers: "
          f"{report['restarted_workers']}", flush=True)

    spec = dict(n_clusters=args.clusters, noise=args.noise, seed=args.seed)
    queries = clustered_vectors(2 * args.queries, args.d, stream=QUERIES, **spec)
    start = time.perf_counter()
    _, truth = exact_neighbours(rows, ids, queries, K)
    flat_qps = len(queries) / (time.perf_counter() - start)
    searcher = Searcher.open(out_dir, "synthetic", args.d, get_vectors=vectors_by_id(ids, rows),
                             rerank_factor=args.rerank_factor, batch_size=1_000)
    tune, evaluate = slice(0, args.queries), slice(args.queries, None)
    params, tune_recall = tune_search_params(searcher, queries[tune], truth[tune], K, config.target_recall)
    searcher.search(queries[evaluate], K)  # warm
    start = time.perf_counter()
    found = searcher.search(queries[evaluate], K).ids
    qps = args.queries / (time.perf_counter() - start)
    codes = Searcher(searcher.index, params, rerank_factor=1, batch_size=1_000).search(queries[evaluate], K).ids
    figures = {
        "n": args.n, "d": args.d, "vector_bytes": vector_bytes, "workers": args.workers, "memory_limit_bytes": limit,
        "factory": sidecar["factory"], "requested_factory": sidecar["requested_factory"], "shards": report["shards"],
        "train_size": args.train_size, "batch": args.batch,
        "peak_rss_mb_per_worker": peaks, "restarted_workers": report["restarted_workers"],
        "driver_peak_rss_mb_build": round(driver_build_peak / MB, 1),  # train + merge (this process)
        "driver_peak_rss_mb_search": round(peak_rss() / MB, 1),  # Flat truth, tuning, the 500-query batches
        "build_seconds": round(build_wall, 1), "ivfdata_mb": round(sidecar["ivfdata"]["bytes"] / MB, 1),
        "index_file_mb": round(sidecar["bytes"] / MB, 2),
        "search_params": params, "rerank_factor": searcher.rerank_factor, "tune_recall": round(tune_recall, 4),
        "recall@10": round(recall_at_k(found, truth[evaluate], K), 4),
        "recall@10_codes_only": round(recall_at_k(codes, truth[evaluate], K), 4),
        "batch_qps": round(qps, 1), "flat_batch_qps": round(flat_qps, 1),
        "total_seconds": round(time.perf_counter() - t0, 1), "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2), "faiss": faiss.__version__,
    }
    print(json.dumps(figures, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
