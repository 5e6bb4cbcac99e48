#!/usr/bin/env bash
# Everything the H200 run checks, in one call (device time is short):
#   the Triton tests on CUDA (incl. the `gpu`-marked ones), then the accuracy/timing table.
# Usage on the GPU machine, from the repo root:  bash scripts/gpu_check.sh
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python -m pytest tests/test_triton.py tests/test_triton_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
python scripts/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu-check.log"
