#!/usr/bin/env bash
# Vocabulary-parallel cutce on the GPUs of one host: equivalence checks (bf16, fp32) against the
# single-GPU call, then the Gemma-shape timing (N=8192 and 65536, D=2304, V=256000 split over the
# GPUs): ratio to the 1-GPU call, peak memory per GPU, bytes communicated per call.
#
#   scripts/multi_gpu.sh [K] [dist_check.py options]     # K defaults to every visible GPU
#   scripts/multi_gpu.sh 1                                # world size 1 (same script, one GPU)
#   scripts/multi_gpu.sh 2 --impl triton --json /tmp/vp2.json
#
# Results also go to $OUT/dist_check_K.json when $OUT is set (the device tool's output folder).
set -euo pipefail
# NVLink multicast stays off: a program that uses it can take the host's shared GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

K=${1:-$($PY -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
[ $# -gt 0 ] && shift
extra=("$@")
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; extra+=(--json "$OUT/dist_check_$K.json"); fi

nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
exec $PY -m torch.distributed.run --standalone --nproc_per_node="$K" scripts/dist_check.py "${extra[@]}"
