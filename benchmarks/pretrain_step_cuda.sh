#!/usr/bin/env bash
# The CUDA figures of issue 15, in one run on one GPU: base preset, ROI 96^3, batch 2 (x2 views), every
# registered method and MONAI's SwinUNETR SSL step in bf16 autocast, eager and compiled, against fp32 eager;
# seconds per step, FLOPs, MFU against the bf16 matmul peak measured in the same run, peak memory, the ratio to
# the SSL step at the same settings; then DAGMaN with each lever alone. Writes
# benchmarks/results/pretrain_step_cuda.json (and prints the tables).
#
# Not run yet: no GPU was available when it was written (see docs/pretraining.md). On an H200, expect tens of
# minutes: every row is a fresh process, and each compiled row compiles the networks first (its compile
# time is reported separately, not in seconds per step).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to measure')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python benchmarks/pretrain_step.py --device cuda --preset base --roi 96 --batch 2 --precision bf16 \
    --compile both --levers --warmup 3 --repeats 10 --json benchmarks/results/pretrain_step_cuda.json "$@"
