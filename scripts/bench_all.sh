#!/usr/bin/env bash
# The runs behind docs/benchmarks.md, on the GPU machine, each part inside one 10-minute call:
#   bash scripts/bench_all.sh tables   # both shapes x both data kinds, every provider
#   bash scripts/bench_all.sh sweep    # Gemma shape, zipf, N = 1k..64k (time/memory vs N)
# The peers' wheels (.whl/, gitignored) must be carried to the machine. CSVs go to $OUT;
# plots are drawn afterwards with `cutce bench --plot-only CSV` (matplotlib).
set -o pipefail
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}
pip install -q --no-deps --no-index --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "peers' wheels not installed"
ALL="cutce-triton cutce-triton-filtered torch torch-compile apple-cce apple-cce-exact liger"
case "$1" in
  tables)
    for s in gemma2-2b llama3-8b; do for d in zipf flat; do
      python -m cutce.cli bench --device cuda --shape $s --data $d --providers $ALL \
        --repeats 5 --warmup 2 --out "$OUT" --no-plot 2>&1 | grep -v Warning
    done; done ;;
  sweep)
    python -m cutce.cli bench --device cuda --shape gemma2-2b --data zipf \
      --sweep-n 1024,4096,16384,65536 \
      --providers cutce-triton cutce-triton-filtered torch apple-cce liger \
      --repeats 3 --warmup 1 --out "$OUT" --no-plot 2>&1 | grep -v Warning ;;
  *) echo "usage: $0 tables|sweep"; exit 2 ;;
esac
