#!/usr/bin/env bash
# The GPU worker image on a machine with an NVIDIA GPU (driver + container toolkit): build docker/Dockerfile's
# gpu target, then inside it check that torch sees CUDA and that faiss-gpu builds and searches a GPU index.
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
