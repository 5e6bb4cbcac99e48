#!/usr/bin/env bash
# One GPU session's checks, each part sized for one 10-minute device call:
#   bash scripts/gpu_session.sh tests     # every GPU test (kernels, fused, grads; ~9 minutes)
#   bash scripts/gpu_session.sh landed    # what the last session landed untimed: its GPU tests,
#                                         # profile, peers and A/Bs (~6 minutes; edit per session)
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
    python -m pytest -q -p no:cacheprovider -x --durations=15 tests/test_requires_grad.py tests/test_fused.py \
      tests/test_triton.py tests/test_triton_gpu.py tests/test_log_probs.py tests/test_class_weight.py tests/test_distill.py tests/test_distill_triton.py tests/test_distill_fused.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -45 ;;
  landed)
    # eighth session's changes (timed in that session, docs/benchmarks.md): the student's Xs on
    # by default at budget 5, the fast log in the JSD's elementwise passes, 5 stages on Hopper;
    # re-run first in the next session as the GPU tests of what landed last
    python -m pytest -q -p no:cacheprovider -x tests/test_distill_fused.py tests/test_distill_triton.py \
      "tests/test_triton_gpu.py::test_gpu_log_fast_subnormals_and_accuracy" 2>&1 | tail -3 \
      | tee "$OUT/landed-tests.log"
    for b in 0.5 0; do
      python scripts/bench_distill.py --betas $b --providers cutce,trl,liger,compile \
        --reps 5 2>&1 | grep -v Warning | grep "^| \|^#"
    done | tee "$OUT/landed-distill.log"
    python scripts/profile_distill.py --beta 0.5 --launches 2>&1 | grep -v "Warn\|_warn" \
      | tee "$OUT/landed-profile.log" | head -12
    # the host prologue cut after the eighth session's last device call (untimed; it measured
    # 1.47 ms before): prediction ~1.0 ms
    python scripts/host_distill.py --beta 0 --calls 10 2>&1 | grep "^#" | tee "$OUT/landed-host.log"
    # the recompute kernels' bulk loads (configs.DISTILL_RECOMPUTE_TMA, off until this A/B):
    # their GPU tests with it on, then budget 0 (and the reverse KL, always recompute) off / on.
    # Prediction: 10-15% faster (budget 0: forward KL 67.9 ms, JSD 98.3 ms in the eighth session)
    CUTCE_DISTILL_RECOMPUTE_TMA=1 python -m pytest -q -p no:cacheprovider -x \
      tests/test_distill_triton.py 2>&1 | tail -2 | tee -a "$OUT/landed-tests.log"
    for tma in 0 1; do
      CUTCE_DISTILL_RECOMPUTE_TMA=$tma python scripts/bench_distill.py --betas 0,0.5,1 \
        --providers cutce --memory-budget 0 --reps 3 2>&1 | grep "^| [01]" | sed "s/^/bulk $tma /"
    done | tee "$OUT/landed-recompute-tma.log"
    # and with 5 stages (163 KB with bulk loads: fits Hopper, not an A100)
    CUTCE_DISTILL_RECOMPUTE_TMA=1 CUTCE_DISTILL_TILE=128,128,64,8,5 python scripts/bench_distill.py \
      --betas 0,0.5,1 --providers cutce --memory-budget 0 --reps 3 2>&1 | grep "^| [01]" \
      | sed "s/^/bulk 1, 5 stages /" | tee -a "$OUT/landed-recompute-tma.log" ;;
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
    # A/B of tiles and options, sized for one device call (~6 minutes). Eighth session's run
    # (below, parts 1-3) is recorded in docs/benchmarks.md: two programs per SM lost (1.29-1.49x
    # forward against the default's 0.99-1.09x); replace these parts with the next A/B.
    # 1. the fused training call at budget 2 with the forward's 128x128, 4-warp tile (below):
    #    106 KB of shared memory with pointer stores (two programs an SM, 1-1.6 KB of spills),
    #    131 KB with bulk stores (one program, no spills)
    for t in default 128,128,64,4,3; do
      for st in 0 1; do
        echo "== CUTCE_FWD_TILE=$t CUTCE_TILE_STORE=$st"
        CUTCE_FWD_TILE=$([ $t = default ] || echo $t) CUTCE_TILE_STORE=$st \
          python scripts/budget_sweep.py --shapes gemma2-2b,16384,4096,32768 --budgets 2 2>&1 \
          | grep "^| [gN]\|^| ll\|^| [0-9]"
      done
    done | tee "$OUT/tune-loss.log"
    # 2. the loss's forward alone (1.12-1.24x of the matmul; the split count measured within
    #    noise, docs/benchmarks.md): a 128x128 tile with 4 warps takes 100 KB of shared memory
    #    and 128 threads x 255 registers, so two programs fit an SM and one's softmax epilogue
    #    can run under the other's product (gpu_compile.py --spills: 208 B stack)
    for t in default 128,128,64,4,3 128,128,64,4,4 128,128,64,8,3; do
      for s in 16384,4096,32768 gemma2-2b; do
        echo "== CUTCE_FWD_TILE=$t $s"
        CUTCE_FWD_TILE=$([ $t = default ] || echo $t) python -m cutce.cli bench --device cuda \
          --shape $s --data zipf --providers cutce-triton --mode fwd --repeats 5 \
          --warmup 2 --no-plot --out "$OUT/fwd-tiles" 2>&1 | grep "cutce-triton"
      done
    done | tee -a "$OUT/tune-loss.log"
    # 3. distillation with the student's Xs stored, across budgets (what default to pick)
    for b in 0.5 0; do
      CUTCE_DISTILL_STUDENT_X=1 python scripts/bench_distill.py --betas $b --providers cutce \
        --memory-budget 3 5 8 --reps 5 2>&1 | grep "^| 0"
    done | tee "$OUT/tune-distill.log" ;;
  *) echo "usage: $0 tests|landed|budget|peers|compile|rl|distill|tune"; exit 2 ;;
esac
