#!/usr/bin/env bash
# The GPU worker image on a machine with an NVIDIA GPU (driver + container toolkit): build docker/Dockerfile's
# gpu target, then inside it check that torch sees CUDA, that faiss-gpu builds and searches a GPU index, and that
# the index stage's build path (knn_diffusion.retrieval.index.build_index, index.use_gpu=always) trains its coarse
# quantizer on the GPU and reaches the recall of the CPU build of the same factory on the same vectors.
# `make test-stack` builds the same target on CPU-only machines and checks only the imports.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${ENGINE:-docker}
"$ENGINE" build -f docker/Dockerfile --target gpu -t knn-diffusion:gpu .
GPU_FLAGS=(--gpus all)
[ "$ENGINE" = podman ] && GPU_FLAGS=(--device nvidia.com/gpu=all)
"$ENGINE" run --rm "${GPU_FLAGS[@]}" knn-diffusion:gpu python -c '
import faiss, numpy as np, torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
x = torch.randn(512, 512, device="cuda"); print("torch", torch.__version__, "CUDA", torch.version.cuda,
      torch.cuda.get_device_name(0), "matmul ok", float((x @ x).sum()) == float((x @ x).sum()))
assert faiss.get_num_gpus() > 0, "faiss-gpu sees no GPU"
data = np.random.default_rng(0).standard_normal((10000, 64)).astype("float32")
index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(64))
index.add(data)
_, ids = index.search(data[:10], 1)
assert (ids[:, 0] == np.arange(10)).all(), ids[:, 0]
print("faiss", faiss.__version__, "GPUs", faiss.get_num_gpus(), "flat IP search ok")
'
"$ENGINE" run --rm "${GPU_FLAGS[@]}" knn-diffusion:gpu python -c '
import numpy as np
from knn_diffusion.retrieval.index import build_index
from knn_diffusion.retrieval.search import Searcher, exact_neighbours, recall_at_k
from knn_diffusion.retrieval.synthetic import QUERIES, clustered_vectors
n, d, factory = 200_000, 512, "IVF512,PQ128x4fs,Refine(SQfp16)"
vectors, ids = clustered_vectors(n, d), np.arange(n)
queries = clustered_vectors(500, d, stream=QUERIES)
_, truth = exact_neighbours(vectors, ids, queries, 10)
for use_gpu in ("always", "never"):
    index, info = build_index(vectors, ids, factory, use_gpu=use_gpu, progress=False)
    found = Searcher(index, {"nprobe": 8}, rerank_factor=20).search(queries, 10).ids
    print(f"build_index use_gpu={use_gpu}: device {info.device}, {info.build_seconds} s, "
          f"recall@10 {recall_at_k(found, truth, 10):.4f}")
    assert info.device == ("cuda:0" if use_gpu == "always" else "cpu"), info
'
