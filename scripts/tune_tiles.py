"""Time the forward and the backward's dz kernel under several tile configs (one GPU call).

    PYTHONPATH=src python scripts/tune_tiles.py [--shape 8192,2304,256000]
Prints ms and the ratio to one bf16 matmul per config. For tuning only; results go to
docs/perf-notes.md by hand.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import cutce  # noqa: E402
from gpu_check import make_data, timeit  # noqa: E402

CONFIGS = ["128,128,64,8,3", "128,128,64,8,4", "128,256,64,8,3", "256,128,64,8,3",
           "128,128,64,4,4", "64,256,64,8,3", "128,256,64,8,4", "128,64,64,4,4"]

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="8192,2304,256000")
ap.add_argument("--configs", default=";".join(CONFIGS))
ap.add_argument("--bwd", action="store_true")
args = ap.parse_args()
n, d, v = map(int, args.shape.split(","))
h, w, t = make_data("zipf", n, d, v, torch.bfloat16)
mm = timeit(lambda: h @ w.T)
print(f"matmul {mm:.2f} ms")
for c in args.configs.split(";"):
    os.environ["CUTCE_FWD_TILE"] = c
    os.environ["CUTCE_BWD_TILE"] = c
    try:
        with torch.no_grad():
            f = timeit(lambda: cutce.linear_cross_entropy(h, w, t, impl="triton"))
        line = f"{c:>18}: fwd {f:7.2f} ms {f / mm:5.2f}x"
        if args.bwd:
            hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()
            def step():
                hg.grad = wg.grad = None
                cutce.linear_cross_entropy(hg, wg, t, impl="triton").backward()
            fb = timeit(step, reps=5, warm=2)
            line += f" | fwd+bwd {fb:7.2f} ms {fb / mm:5.2f}x"
        print(line, flush=True)
    except Exception as e:
        print(f"{c:>18}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
