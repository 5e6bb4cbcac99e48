#!/usr/bin/env bash
# What to run on the GPU machine, one part per 10-minute device call (run from the repository
# root; results and logs go to $OUT, default ./bench-out):
#   bash benchmarks/device.sh tests          # the loss's GPU tests (~5.5 minutes on an H200)
#   bash benchmarks/device.sh tests-distill  # the distillation's GPU tests (~4 minutes)
#   bash benchmarks/device.sh loss           # cutce bench at gemma2-2b and llama3-8b, every peer
#   bash benchmarks/device.sh long           # cutce bench at gemma3-64k (65536 tokens, V=262144)
#   bash benchmarks/device.sh log-probs      # log-probs + entropy vs TRL, token_log_probs end to end
#   bash benchmarks/device.sh truncated      # top-k/top-p/min-p log-probs vs untruncated cutce, eager, compile
#   bash benchmarks/device.sh tests-rl       # GPU tests of truncated log-probs and sparse distillation
#   bash benchmarks/device.sh sparse-distill # sparse-teacher distillation vs cutce's CE, eager, compile
#   bash benchmarks/device.sh distill        # distillation vs TRL, Liger, eager, compile (beta 0, 0.5)
#   bash benchmarks/device.sh hf-step        # HF training step: original vs patched, eager vs compiled
#   bash benchmarks/device.sh multi-gpu      # vocabulary-parallel on every GPU of the host
#   bash benchmarks/device.sh trainers       # TRL's SFT/DPO/GRPO steps: TRL's head, plain logits, cutce
# Peers (liger-kernel, cut-cross-entropy, trl, ...) come as wheels in .whl/, installed without
# the network. Then publish the JSON in $OUT as benchmarks/README.md says ("The results page").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
    || echo "peers' wheels not installed: their rows will say so"
fi
PYTEST=(python -m pytest -q -p no:cacheprovider -x --durations=10)
case "${1:-}" in
  tests)
    "${PYTEST[@]}" tests/test_requires_grad.py tests/test_fused.py tests/test_triton.py \
      tests/test_triton_gpu.py tests/test_log_probs.py tests/test_class_weight.py \
      2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
  tests-distill)
    "${PYTEST[@]}" tests/test_distill.py tests/test_distill_triton.py tests/test_distill_fused.py \
      2>&1 | tee "$OUT/gpu-tests-distill.log" | tail -20 ;;
  loss)
    for s in gemma2-2b llama3-8b; do
      python -m cutce.cli bench --device cuda --shape "$s" --data zipf \
        --providers cutce-triton cutce-triton-auto cutce-triton-recompute torch torch-compile liger apple-cce apple-cce-exact \
        --repeats 5 --warmup 2 --out "$OUT" --no-plot
    done 2>&1 | tee "$OUT/loss.log" ;;
  long)
    # eager torch needs the 64 GiB float32 logits: its row shows the OOM
    python -m cutce.cli bench --device cuda --shape gemma3-64k --data zipf \
      --providers cutce-triton cutce-triton-auto cutce-triton-recompute torch torch-compile liger apple-cce \
      --repeats 3 --warmup 1 --out "$OUT" --no-plot 2>&1 | tee "$OUT/long.log" ;;
  log-probs)
    python benchmarks/log_probs.py --out "$OUT" 2>&1 | tee "$OUT/log-probs.log" ;;
  tests-rl)
    "${PYTEST[@]}" tests/test_truncated_log_probs.py tests/test_truncated_mixed.py \
      tests/test_truncated_routes.py tests/test_sparse_distill.py tests/test_gather.py \
      2>&1 | tee "$OUT/gpu-tests-rl.log" | tail -20 ;;
  sparse-distill)
    python benchmarks/sparse_distill.py --out "$OUT" 2>&1 | tee "$OUT/sparse-distill.log" ;;
  truncated)
    python benchmarks/truncated.py --out "$OUT" 2>&1 | tee "$OUT/truncated.log" ;;
  distill)
    # one run per beta keeps each inside its time budget
    for b in 0 0.5; do
      python benchmarks/distill.py --betas "$b" --out "$OUT"
    done 2>&1 | tee "$OUT/distill.log" ;;
  hf-step)
    python benchmarks/hf_step.py --out "$OUT" 2>&1 | tee "$OUT/hf-step.log" ;;
  multi-gpu)
    python benchmarks/multi_gpu.py --out "$OUT" 2>&1 | tee "$OUT/multi-gpu.log" ;;
  trainers)
    python benchmarks/trainers.py --out "$OUT" 2>&1 | tee "$OUT/trainers.log" ;;
  *)
    echo "usage: $0 tests|tests-distill|tests-rl|loss|long|log-probs|truncated|sparse-distill|distill|hf-step|multi-gpu|trainers"; exit 2 ;;
esac
