"""Benchmark the default large-set index against exact ``Flat`` search and the previous default, in
the same process.

Data: ``knn_diffusion.retrieval.synthetic`` clustered unit vectors (seeded, documented there; written
once to a float32 .npy under --workdir and memory-mapped), or real embeddings from an EmbeddingStore
directory (--embeddings; queries are then held-out rows of the store). Queries are split in two
halves: the first tunes nprobe, the second is what every figure below is measured on.

Reported recall is 10-recall@10 (k-recall@k with k=10): the mean fraction of the exact 10 nearest
ids (by inner product on unit vectors = cosine) found among the 10 returned.
QPS is timed by repeating a warm search until --min-seconds have passed: "batch" searches all
evaluation queries in one call, "single" one query per call on one OpenMP thread.
RAM bytes/vector: codes + ids, computed from the index internals (``index_bytes_per_vector``).
The re-rank store is reported apart ("store"): the new default's float16 copy inside the index file,
memory-mapped by ``load_index`` (page cache); the previous default re-ranks against the float32 rows
of the memory-mapped .npy (page cache too). "load" is the 1-minute load average after each row:
the box is shared, so the ratio against Flat measured in the same process is the figure to compare.

    python benchmarks/bench_retrieval.py --n 100000          # quick
    python benchmarks/bench_retrieval.py                     # 1,000,000 x 512 (heavy)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import faiss
import numpy as np

from knn_diffusion.io import write_json
from knn_diffusion.retrieval.index import (
    build_index,
    choose_factory,
    index_bytes_per_vector,
    load_index,
    normalised,
    refine_of,
    save_index,
)
from knn_diffusion.retrieval.search import Searcher, recall_at_k, tune_search_params, vectors_by_id
from knn_diffusion.retrieval.synthetic import DATABASE, QUERIES, clustered_blocks, clustered_vectors

from timing import call_times, clock  # benchmarks/timing.py, beside this script

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
    """Warm up once, then repeat until ``min_seconds`` have passed: one query per call, or all at once.
    Single queries run on one OpenMP thread (as a latency-bound server would): on a shared box a second
    thread's wake-up per parallel region costs more than the whole search."""
    calls = [queries[i:i + 1] for i in range(len(queries))] if single else [queries]
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1 if single else threads)
    try:
        times = call_times(lambda i: search(calls[i % len(calls)]), warmup=1, min_seconds=min_seconds)
        return len(times) * len(calls[0]) / sum(times)
    finally:
        faiss.omp_set_num_threads(threads)


def measure(name: str, search, queries: np.ndarray, truth: np.ndarray, min_seconds: float,
            **facts) -> dict:
    found = search(queries)
    return {"index": name, **facts, "recall@10": round(recall_at_k(found, truth, K), 4),
            "batch_qps": round(queries_per_second(search, queries, False, min_seconds), 1),
            "single_qps": round(queries_per_second(search, queries, True, min_seconds), 1),
            "load_average": round(os.getloadavg()[0], 2)}


def index_rows(factory: str, role: str, database, ids, tune_queries, eval_queries, truth, args) -> list[dict]:
    """Build ``factory``, tune it to the target on the tuning half, and measure it (codes only, and
    with its re-rank) on the evaluation half. An index with a re-rank store is saved and searched
    through ``load_index`` (its store memory-mapped, as the pipeline does); any other re-ranks against
    the memory-mapped database."""
    index, info = build_index(database, ids, factory, train_size=args.train_size, seed=args.seed,
                              bytes_per_vector=args.bytes_per_vector)
    memory = index_bytes_per_vector(index)
    get_vectors = None
    if refine_of(index) is not None:
        save_index(index, Path(args.workdir) / "index", {"fingerprint": "bench"})
        del index
        index, _ = load_index(Path(args.workdir) / "index", mmap=True)
    else:
        get_vectors = vectors_by_id(ids, database)  # reads the memory map
    searcher = Searcher(index, get_vectors=get_vectors, rerank_factor=args.rerank_factor, batch_size=1_000)
    params, tune_recall = tune_search_params(searcher, tune_queries, truth[:len(tune_queries)], K,
                                             args.target_recall)
    rows = []
    # The same probes without re-ranking show the recall cap of the codes themselves.
    for rerank in sorted({1, searcher.rerank_factor}):
        searcher = Searcher(index, params, get_vectors=get_vectors, rerank_factor=rerank, batch_size=1_000)
        name = factory + (f" + re-rank of top {K * rerank}" if rerank > 1 else " (codes only)")
        rows.append(measure(name, lambda q: searcher.search(q, K).ids, eval_queries,
                            truth[len(tune_queries):], args.min_seconds, role=role,
                            build_s=info.build_seconds, bytes_per_vector=memory["codes_and_ids"],
                            rerank_store_bytes_per_vector=(memory["rerank_store"] or 4 * database.shape[1])
                            if rerank > 1 else 0,
                            serialised_bytes_per_vector=memory["serialised"], params=params,
                            tune_recall=round(tune_recall, 4)))
    return rows[::-1]  # the re-ranked row first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1_000, help="evaluation queries (as many more tune)")
    parser.add_argument("--clusters", type=int, default=2_000)
    parser.add_argument("--noise", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embeddings", help="EmbeddingStore directory instead of synthetic data")
    parser.add_argument("--factory", default="auto", help="the new default (auto: choose_factory)")
    parser.add_argument("--also", nargs="*", default=[], help="more factory strings to measure")
    parser.add_argument("--skip-previous", action="store_true", help="leave out the previous default")
    parser.add_argument("--bytes-per-vector", type=int, default=256)
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--rerank-factor", type=int, default=40, help="widest the tuner may use (index.rerank_factor)")
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

    def build_flat() -> faiss.Index:
        index = faiss.IndexFlatIP(d)
        for lo in range(0, n, 65_536):
            index.add(normalised(database[lo:lo + 65_536]))
        return index

    flat, flat_build = clock(build_flat)
    _, truth_positions = flat.search(queries, K)  # exact ground truth (Q, 10)
    truth = ids[truth_positions]
    rows = [measure("Flat (exact)", lambda q, flat=flat: ids[flat.search(q, K)[1]], eval_queries,
                    truth[len(tune_queries):], args.min_seconds, role="exact baseline",
                    build_s=round(flat_build, 1), bytes_per_vector=4 * d + 8, params={})]
    del flat

    previous = f"IVF{2 ** round(np.log2(np.sqrt(n)))},PQ{d}x4fs"  # the default before the re-rank store
    contenders = [(args.factory if args.factory != "auto" else choose_factory(n, d, args.bytes_per_vector),
                   "new default")]
    contenders += [(factory, "alternative") for factory in args.also]
    if not args.skip_previous:
        contenders.append((previous, "previous default (re-rank from the memory-mapped float32 rows)"))
    for factory, role in contenders:
        rows += index_rows(factory, role, database, ids, tune_queries, eval_queries, truth, args)

    flat_qps = rows[0]["batch_qps"], rows[0]["single_qps"]
    print(f"\n{'index':64} {'build s':>8} {'B/vec':>7} {'store':>6} {'10-R@10':>8} {'batch QPS':>10} "
          f"{'x Flat':>7} {'1-q QPS':>8} {'x Flat':>7} {'load':>5}  params")
    for row in rows:
        row["batch_speedup"] = round(row["batch_qps"] / flat_qps[0], 1)
        row["single_speedup"] = round(row["single_qps"] / flat_qps[1], 1)
        print(f"{row['index']:64} {row['build_s']:8.1f} {row['bytes_per_vector']:7.1f} "
              f"{row.get('rerank_store_bytes_per_vector', 0):6.0f} {row['recall@10']:8.4f} "
              f"{row['batch_qps']:10.1f} {row['batch_speedup']:7.1f} {row['single_qps']:8.1f} "
              f"{row['single_speedup']:7.1f} {row['load_average']:5.1f}  {row['params']}")
    result = {"args": vars(args), "n": n, "d": d, "faiss": faiss.__version__,
              "threads": faiss.omp_get_max_threads(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "recall": "10-recall@10", "rows": rows}
    write_json(args.json, result)
    print(f"\nwrote {args.json}")
    print(json.dumps(rows[1]))


if __name__ == "__main__":
    main()
