#!/usr/bin/env bash
# Continuous model on one GPU: training steps/s of the paper's 100M and 400M U-Nets in bf16 at 64x64,
# and the latency of one 64x64 image (batch 1, guided: cond + null in one forward).
# Usage (from the repository root, on a CUDA machine): bash benchmarks/gpu_continuous.sh [out_dir]
# The paper reports 7 s per image for its 400M model (its sampler and step count are not stated).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/bench-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

# Training throughput and sampling images/s (batch 64, 25 DPM-Solver++ steps).
"$PY" benchmarks/bench_continuous.py --presets 100M 400M --resolution 64 --batch-size 64 --precision bf16 \
  --num-workers 4 --sample-batch 64 --sample-steps 25 --min-seconds 20 --json "$OUT/throughput.json"

# Latency of one 64x64 image: 25 DPM-Solver++ steps, then 250 DDPM steps.
for spec in "dpm_solver_pp 25" "ddpm 250"; do
  set -- $spec
  "$PY" benchmarks/bench_continuous.py --presets 400M --resolution 64 --precision bf16 --sampling-only \
    --sample-batch 1 --scheduler "$1" --sample-steps "$2" --min-seconds 5 --json "$OUT/latency-$1.json"
done
echo "results in $OUT (sample_s_per_batch with sample_batch 1 is the one-image latency)"
