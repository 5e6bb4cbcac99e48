#!/usr/bin/env bash
# Before/after on one GPU in one run: the same benchmark scripts (this checkout's) over a base
# revision's library and this checkout's, in interleaved rounds, so that both see the same
# machine, clocks and neighbours. A change that touches the kernels or the call path is checked
# with it before it lands.
#   git archive BASE_REV src | tar -x -C /path/to/base        # the base library, once
#   bash benchmarks/compare.sh /path/to/base [ROUNDS] [PARTS]   # PARTS: loss log-probs distill
# Each round writes its JSON under $OUT/compare/<base|this><round>/ and one line per result file
# to $OUT/compare.jsonl; a summary of medians is printed at the end.
set -u
cd "$(dirname "$0")/.."
BASE=$(cd "$1" && pwd)
ROUNDS=${2:-3}
PARTS=" ${3:-loss log-probs distill} "
OUT=${OUT:-bench-out}
mkdir -p "$OUT/compare"
export PYTHONUNBUFFERED=1
for round in $(seq 1 "$ROUNDS"); do
  for tree in base this; do
    o="$OUT/compare/$tree$round"; mkdir -p "$o"
    if [ "$tree" = base ]; then export PYTHONPATH="$BASE/src"; else export PYTHONPATH="$PWD/src"; fi
    echo "=== $tree, round $round"
    case "$PARTS" in *" loss "*)
      python -m cutce.cli bench --device cuda --shape gemma2-2b --data zipf --repeats 5 --warmup 2 \
        --providers cutce-triton cutce-triton-recompute --out "$o" --no-plot | tail -3 ;; esac
    case "$PARTS" in *" log-probs "*)
      python benchmarks/log_probs.py --providers cutce --no-e2e --out "$o" | tail -3 ;; esac
    case "$PARTS" in *" distill "*)
      python benchmarks/distill.py --providers cutce --betas 0,0.5 --out "$o" | tail -3 ;; esac
  done
done
python - "$OUT/compare" <<'PY'
import glob, json, statistics, sys, collections
times = collections.defaultdict(list)
for f in sorted(glob.glob(sys.argv[1] + "/*/*.json")):
    tree = f.split("/")[-2].rstrip("0123456789")
    for r in json.load(open(f))["rows"]:
        ms = r.get("fwdbwd_ms", r.get("fwd_bwd_ms", r.get("ms")))
        name = r["provider"] + (f" beta={r['beta']}" if "beta" in r else "")
        if ms is not None:
            times[name, tree].append(ms)
for name in sorted({k[0] for k in times}):
    b, t = times.get((name, "base"), []), times.get((name, "this"), [])
    if b and t:
        mb, mt = statistics.median(b), statistics.median(t)
        print(f"{name:32s} base {mb:8.2f} ms  this {mt:8.2f} ms  ({mt / mb:.3f}x, {len(b)} rounds)")
PY
