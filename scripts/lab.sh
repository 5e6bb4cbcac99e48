#!/usr/bin/env bash
# One device call: kernel-variant sweep, kernel time split, then the Triton tests on CUDA.
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-lab-out}
python scripts/kernel_lab.py --shape gemma2-2b 2>&1 | tee "$OUT/lab-gemma.log"
python scripts/kernel_lab.py --shape llama3-8b --variants v1,new,zt-gather,chunk16k 2>&1 | tee "$OUT/lab-llama.log"
python scripts/kernel_lab.py --shape 65536,2304,256000 --variants v1,new 2>&1 | tee "$OUT/lab-65k.log"
python scripts/profile_bwd.py 2>&1 | tee "$OUT/profile.log" | head -30
timeout 240 python -m pytest tests/test_triton.py tests/test_log_probs.py -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -8
