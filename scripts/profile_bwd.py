"""Kernel-level time split of one fwd+bwd (torch.profiler), for docs/perf-notes.md.

    PYTHONPATH=src python scripts/profile_bwd.py [--shape 8192,2304,256000]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import cutce  # noqa: E402
from gpu_check import make_data  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="8192,2304,256000")
ap.add_argument("--filter", action="store_true")
ap.add_argument("--data", default="zipf")
args = ap.parse_args()
n, d, v = map(int, args.shape.split(","))
h, w, t = make_data(args.data, n, d, v, torch.bfloat16)
h.requires_grad_()
w.requires_grad_()
kw = dict(filter_eps="auto") if args.filter else {}
for _ in range(2):
    cutce.linear_cross_entropy(h, w, t, impl="triton", **kw).backward()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    h.grad = w.grad = None
    cutce.linear_cross_entropy(h, w, t, impl="triton", **kw).backward()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
