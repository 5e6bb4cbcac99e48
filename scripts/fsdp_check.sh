#!/usr/bin/env bash
# FSDP2 training of a patched causal LM: world size K vs 1 with the same global batch, judged
# against the seed-to-seed noise of two 1-GPU runs (mean |Δ loss| over the last 20 steps).
#   bash scripts/fsdp_check.sh [K] [fsdp_train.py options]       (K defaults to 2)
set -euo pipefail
# NVLink multicast stays off: a program that uses it can take the host's shared GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
K=${1:-2}
[ $# -gt 0 ] && shift
D=${OUT:-$(mktemp -d)}
mkdir -p "$D"
run() { $PY -m torch.distributed.run --standalone --nproc_per_node="$1" scripts/fsdp_train.py --seed "$2" --json "$D/fsdp_w$1_s$2.json" "${@:3}"; }
run 1 0 "$@"
run 1 1 "$@"
run "$K" 0 "$@"
$PY - "$D" "$K" <<'EOF'
import json, sys
d, k = sys.argv[1], sys.argv[2]
load = lambda w, s: json.load(open(f"{d}/fsdp_w{w}_s{s}.json"))["losses"]
a, b, c = load(1, 0), load(1, 1), load(k, 0)
tail = lambda x, y: sum(abs(p - q) for p, q in zip(x[-20:], y[-20:])) / len(x[-20:])
print(f"mean |Δ loss| over the last 20 steps: {k} GPUs vs 1 GPU (same seed) {tail(c, a):.4f}; "
      f"1 GPU seed 1 vs seed 0 (noise) {tail(b, a):.4f}")
print(f"max |Δ loss| over all steps, {k} vs 1: {max(abs(p - q) for p, q in zip(c, a)):.4f}")
EOF
