#!/usr/bin/env bash
# Discrete model on one GPU, random weights: the paper's 400M transformer at 32x32 tokens (2,887 codes,
# d=512, k=10) in bf16 - sampling latency of ONE image with guidance (cond + null in one forward per
# step) over N=100 steps and the strided 25-step mode, plus training steps/s at batch 32.
# The paper: 7 s per image for its 400M model. VQ decoding (one decoder pass) is not included.
# Usage (from the repository root, on a CUDA machine): bash benchmarks/gpu_discrete.sh [out_dir]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/bench-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
COMMON=(--presets 400M --side 32 --codes 2887 --dim 512 --k 10 --precision bf16 --guidance 8 --min-seconds 10)
"$PY" benchmarks/bench_discrete.py "${COMMON[@]}" --batch-size 32 --sample-batch 1 --sample-steps 100 \
  --json "$OUT/discrete-400M-n100.json"
"$PY" benchmarks/bench_discrete.py "${COMMON[@]}" --sampling-only --sample-batch 1 16 --sample-steps 25 \
  --json "$OUT/discrete-400M-n25.json"
echo "results in $OUT (sample_s_batch1 is the one-image latency)"
