#!/usr/bin/env bash
# One device call: kernel-variant sweeps (see scripts/kernel_lab.py); logs under $OUT.
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-lab-out}
python scripts/kernel_lab.py --shape gemma2-2b --variants new,group-all,new --filtered 2>&1 | tee "$OUT/lab-gemma.log"
python scripts/kernel_lab.py --shape gemma2-2b --data flat --variants new --filtered 2>&1 | tee "$OUT/lab-gemma-flat.log"
python scripts/kernel_lab.py --shape llama3-8b --variants new,group-all --filtered 2>&1 | tee "$OUT/lab-llama.log"
python scripts/kernel_lab.py --shape 65536,2304,256000 --variants new,group-all 2>&1 | tee "$OUT/lab-65k.log"
