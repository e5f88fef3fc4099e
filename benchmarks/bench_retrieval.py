"""Benchmark the default large-set index against exact ``Flat`` search in the same process.

Data: ``knn_diffusion.retrieval.synthetic`` clustered unit vectors (seeded, documented there; written
once to a float32 .npy under --workdir and memory-mapped), or real embeddings from an EmbeddingStore
directory (--embeddings; queries are then held-out rows of the store). Queries are split in two
halves: the first tunes nprobe, the second is what every figure below is measured on.

Reported recall is 10-recall@10 (k-recall@k with k=10): the mean fraction of the exact 10 nearest
ids (by inner product on unit vectors = cosine) found among the 10 returned.
QPS is timed by repeating a warm search until --min-seconds have passed: "batch" searches all
evaluation queries in one call, "single" one query per call.
RAM bytes/vector: codes + ids, computed from the index internals (``index_bytes_per_vector``); the
exact re-ranking reads the full vectors from the memory-mapped .npy (page cache, not the index).

    python benchmarks/bench_retrieval.py --n 100000          # quick
    python benchmarks/bench_retrieval.py                     # 1,000,000 x 512 (heavy)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from knn_diffusion.io import write_json
from knn_diffusion.retrieval.index import build_index, index_bytes_per_vector, normalised
from knn_diffusion.retrieval.search import (Searcher, recall_at_k, tune_search_params, vectors_by_id)
from knn_diffusion.retrieval.synthetic import DATABASE, QUERIES, clustered_blocks, clustered_vectors

K = 10


def synthetic_data(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(memory-mapped database (n, d), ids (n,), queries (2q, d)), the database cached on disk."""
    spec = dict(n_clusters=args.clusters, noise=args.noise, seed=args.seed)
    path = Path(args.workdir) / f"synthetic-{args.n}x{args.d}-c{args.clusters}-s{args.noise}-{args.seed}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(args.n, args.d))
        lo = 0
        for block in clustered_blocks(args.n, args.d, stream=DATABASE, **spec):
            out[lo:lo + len(block)] = block
            lo += len(block)
        out.flush()
        del out
        os.replace(tmp, path)
    database = np.load(path, mmap_mode="r")
    queries = clustered_vectors(2 * args.queries, args.d, stream=QUERIES, **spec)
    return database, np.arange(args.n, dtype=np.int64), queries


def store_data(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An EmbeddingStore dir (emb-*.npy, ids-*.npy): 2q random rows become queries, the rest the DB."""
    root = Path(args.embeddings)
    vectors = np.concatenate([np.load(p) for p in sorted(root.glob("emb-*.npy"))]).astype(np.float32)
    ids = np.concatenate([np.load(p) for p in sorted(root.glob("ids-*.npy"))]).astype(np.int64)
    held_out = np.random.default_rng(args.seed).choice(len(ids), size=2 * args.queries, replace=False)
    keep = np.ones(len(ids), bool)
    keep[held_out] = False
    return normalised(vectors[keep]), ids[keep], normalised(vectors[held_out])


def queries_per_second(search, queries: np.ndarray, single: bool, min_seconds: float) -> float:
    """Warm up once, then repeat until ``min_seconds`` have passed."""
    calls = [queries[i:i + 1] for i in range(len(queries))] if single else [queries]
    search(calls[0])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for batch in calls:
            search(batch)
            done += len(batch)
            if single and time.perf_counter() - start >= min_seconds:
                break
    return done / (time.perf_counter() - start)


def measure(name: str, search, queries: np.ndarray, truth: np.ndarray, min_seconds: float,
            **facts) -> dict:
    found = search(queries)
    return {"index": name, **facts, "recall@10": round(recall_at_k(found, truth, K), 4),
            "batch_qps": round(queries_per_second(search, queries, False, min_seconds), 1),
            "single_qps": round(queries_per_second(search, queries, True, min_seconds), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1_000, help="evaluation queries (as many more tune)")
    parser.add_argument("--clusters", type=int, default=2_000)
    parser.add_argument("--noise", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embeddings", help="EmbeddingStore directory instead of synthetic data")
    parser.add_argument("--factory", default="auto")
    parser.add_argument("--bytes-per-vector", type=int, default=256)
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--rerank-factor", type=int, default=10)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--workdir", default="/tmp/bench_retrieval")
    parser.add_argument("--json", default="benchmarks/results/bench_retrieval.json")
    args = parser.parse_args()

    database, ids, queries = store_data(args) if args.embeddings else synthetic_data(args)
    n, d = database.shape
    tune_queries, eval_queries = queries[:len(queries) // 2], queries[len(queries) // 2:]
    print(f"database {n} x {d}, {len(eval_queries)} evaluation queries, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads")

    start = time.perf_counter()
    flat = faiss.IndexFlatIP(d)
    for lo in range(0, n, 65_536):
        flat.add(normalised(database[lo:lo + 65_536]))
    flat_build = time.perf_counter() - start
    _, truth_positions = flat.search(queries, K)  # exact ground truth (Q, 10)
    truth = ids[truth_positions]
    rows = [measure("Flat (exact)", lambda q: ids[flat.search(q, K)[1]], eval_queries,
                    truth[len(tune_queries):], args.min_seconds, build_s=round(flat_build, 1),
                    bytes_per_vector=4 * d + 8, params={})]
    del flat

    index, info = build_index(database, ids, args.factory, train_size=args.train_size,
                              seed=args.seed, bytes_per_vector=args.bytes_per_vector)
    memory = index_bytes_per_vector(index)
    get_vectors = vectors_by_id(ids, database)  # reads the memory map
    searcher = Searcher(index, get_vectors=get_vectors, rerank_factor=args.rerank_factor, batch_size=1_000)
    params, tune_recall = tune_search_params(searcher, tune_queries, truth[:len(tune_queries)], K,
                                             args.target_recall)
    # The same probes without re-ranking show the recall cap of the PQ codes themselves.
    for rerank in sorted({1, searcher.rerank_factor}):
        searcher = Searcher(index, params, get_vectors=get_vectors, rerank_factor=rerank, batch_size=1_000)
        name = info.factory + (f" + exact re-rank of top {K * rerank}" if rerank > 1 else "")
        rows.append(measure(name, lambda q: searcher.search(q, K).ids, eval_queries,
                            truth[len(tune_queries):], args.min_seconds,
                            build_s=info.build_seconds, bytes_per_vector=memory["codes_and_ids"],
                            serialised_bytes_per_vector=memory["serialised"], params=params,
                            tune_recall=round(tune_recall, 4)))

    flat_qps = rows[0]["batch_qps"], rows[0]["single_qps"]
    print(f"\n{'index':58} {'build s':>8} {'B/vec':>7} {'10-R@10':>8} {'batch QPS':>10} "
          f"{'x Flat':>7} {'1-q QPS':>8} {'x Flat':>7}  params")
    for row in rows:
        row["batch_speedup"] = round(row["batch_qps"] / flat_qps[0], 1)
        row["single_speedup"] = round(row["single_qps"] / flat_qps[1], 1)
        print(f"{row['index']:58} {row['build_s']:8.1f} {row['bytes_per_vector']:7.1f} "
              f"{row['recall@10']:8.4f} {row['batch_qps']:10.1f} {row['batch_speedup']:7.1f} "
              f"{row['single_qps']:8.1f} {row['single_speedup']:7.1f}  {row['params']}")
    result = {"args": vars(args), "n": n, "d": d, "faiss": faiss.__version__,
              "threads": faiss.omp_get_max_threads(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "device": info.device, "recall": "10-recall@10", "rows": rows}
    write_json(args.json, result)
    print(f"\nwrote {args.json}")
    print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
