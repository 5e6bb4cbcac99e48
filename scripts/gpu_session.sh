#!/usr/bin/env bash
# One GPU session's checks, each part sized for one 10-minute device call:
#   bash scripts/gpu_session.sh tests     # the loss's GPU tests (kernels, fused, grads; ~5.5 min)
#   bash scripts/gpu_session.sh tests-distill  # the distillation's GPU tests (~4 minutes)
#   bash scripts/gpu_session.sh landed    # what the last session landed: its GPU tests, peers,
#                                         # A/Bs and profile (~6 minutes; edit per session)
#   bash scripts/gpu_session.sh budget    # time/memory vs memory_budget (scripts/budget_sweep.py)
#   bash scripts/gpu_session.sh peers     # cutce bench tables with every peer (carry .whl/)
#   bash scripts/gpu_session.sh compile   # transformers: compiled vs eager patched step
#   bash scripts/gpu_session.sh rl        # log-probs + entropy vs TRL, token_log_probs end to end
#   bash scripts/gpu_session.sh distill   # distillation vs TRL, Liger, eager, compile (beta 0, 0.5)
#   bash scripts/gpu_session.sh tune      # A/B of tiles and options not yet timed (see the part)
# Logs and CSVs go to $OUT.
set -o pipefail
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
export OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
[ -d .whl ] && { pip install -q --no-deps --no-index --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
  || echo "peers' wheels not installed"; }
case "$1" in
  tests)
    # the loss's GPU tests (5.4 minutes on the H200, ninth session); the distillation's below
    python -m pytest -q -p no:cacheprovider -x --durations=15 tests/test_requires_grad.py tests/test_fused.py \
      tests/test_triton.py tests/test_triton_gpu.py tests/test_log_probs.py tests/test_class_weight.py \
      2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
  tests-distill)
    # the distillation's GPU tests (~4 minutes)
    python -m pytest -q -p no:cacheprovider -x --durations=10 tests/test_distill.py \
      tests/test_distill_triton.py tests/test_distill_fused.py \
      2>&1 | tee "$OUT/gpu-tests-distill.log" | tail -20 ;;
  landed)
    # What the last session landed, re-run first in the next one. Ninth session: the
    # distillation's recompute kernels load by tensor descriptors by default
    # (configs.DISTILL_RECOMPUTE_TMA; budget 0 forward KL 68.1 -> 61.5-62.5 ms, JSD 99.4 -> 90.2)
    python -m pytest -q -p no:cacheprovider -x tests/test_distill_fused.py tests/test_distill_triton.py \
      "tests/test_triton_gpu.py::test_gpu_log_fast_subnormals_and_accuracy" 2>&1 | tail -3 \
      | tee "$OUT/landed-tests.log"
    for b in 0.5 0; do
      python scripts/bench_distill.py --betas $b --providers cutce,trl,liger,compile \
        --reps 5 2>&1 | grep -v Warning | grep "^| \|^#"
    done | tee "$OUT/landed-distill.log"
    for tma in 0 1; do
      CUTCE_DISTILL_RECOMPUTE_TMA=$tma python scripts/bench_distill.py --betas 0,0.5,1 \
        --providers cutce --memory-budget 0 --reps 3 2>&1 | grep "^| [01]" | sed "s/^/bulk $tma /"
    done | tee "$OUT/landed-recompute-tma.log"
    python scripts/profile_distill.py --beta 0 --launches 2>&1 | grep -v "Warn\|_warn" \
      | tee "$OUT/landed-profile.log" | head -12
    python scripts/host_distill.py --beta 0 --calls 10 2>&1 | grep "^#" | tee "$OUT/landed-host.log" ;;
  budget)
    python scripts/budget_sweep.py "${@:2}" 2>&1 | grep -v Warning | tee "$OUT/budget.log" ;;
  peers)
    for s in ${2:-gemma2-2b llama3-8b}; do
      python -m cutce.cli bench --device cuda --shape $s --data zipf \
        --providers cutce-triton cutce-triton-recompute torch-compile liger apple-cce-exact \
        --repeats 5 --warmup 2 --out "$OUT" --no-plot 2>&1 | grep -v Warning
    done ;;
  compile)
    python scripts/compile_step.py 2>&1 | grep -v Warning | tee "$OUT/compile.log" ;;
  rl)
    python scripts/bench_token_log_probs.py --reps 3 --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/rl.log" ;;
  distill)
    for b in 0 0.5; do
      python scripts/bench_distill.py --betas $b --reps 3 2>&1 | grep -v Warning | tee -a "$OUT/distill.log"
    done ;;
  tune)
    # A/B of tiles and options, sized for one device call. Ninth session (docs/perf-notes.md v9):
    # Triton 3.6's Hopper warp specialization (64-row tiles, 12 warps) 1.5-2x slower; the
    # statistics kernel with the teacher's product first at 128x256 / 256x128 tiles (spills)
    # 8-24% slower, at the default tile equal; the vocabulary split rule best of 6-36 splits.
    # Those switches are not kept. The split sweep stays as the template for the next A/B:
    for s in default 12 24; do
      CUTCE_VOCAB_SPLITS=$([ $s = default ] || echo $s) python scripts/bench_distill.py --betas 0 \
        --providers cutce --reps 5 2>&1 | grep "^| 0" | sed "s/^/splits $s /"
    done | tee "$OUT/tune.log" ;;
  *) echo "usage: $0 tests|tests-distill|landed|budget|peers|compile|rl|distill|tune"; exit 2 ;;
esac
