"""Kernel-level time split of one fwd+bwd (torch.profiler), for docs/perf-notes.md.

    PYTHONPATH=src python scripts/profile_bwd.py [--shape 8192,2304,256000] [--budget B] [--gaps]

--gaps also lists where the GPU sat idle between kernels (from the profiler's trace): the sum
of GPU time and the wall time of a call differ by that idle time.
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
ap.add_argument("--budget", type=float, default=None)
ap.add_argument("--gaps", action="store_true")
args = ap.parse_args()
n, d, v = map(int, args.shape.split(","))
h, w, t = make_data(args.data, n, d, v, torch.bfloat16)
h.requires_grad_()
w.requires_grad_()
kw = dict(filter_eps="auto") if args.filter else {}
kw["memory_budget"] = args.budget
for _ in range(2):
    cutce.linear_cross_entropy(h, w, t, impl="triton", **kw).backward()
torch.cuda.synchronize()
walls = []
for _ in range(5):
    h.grad = w.grad = None
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    cutce.linear_cross_entropy(h, w, t, impl="triton", **kw).backward()
    e1.record()
    e1.synchronize()
    walls.append(e0.elapsed_time(e1))
print(f"fwd+bwd wall (CUDA events, median of 5): {sorted(walls)[2]:.2f} ms")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    h.grad = w.grad = None
    cutce.linear_cross_entropy(h, w, t, impl="triton", **kw).backward()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
if args.gaps:
    import json
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        evs = json.load(f)["traceEvents"]
    gpu = sorted((e for e in evs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                  and "dur" in e), key=lambda e: e["ts"])
    busy = sum(e["dur"] for e in gpu)
    span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
    gaps = []
    end = gpu[0]["ts"] + gpu[0]["dur"]
    for prev, e in zip(gpu, gpu[1:]):
        if e["ts"] > end:
            gaps.append((e["ts"] - end, prev["name"][:50], e["name"][:50]))
        end = max(end, e["ts"] + e["dur"])
    print(f"GPU kernels: {len(gpu)}, busy {busy / 1e3:.2f} ms, first-to-last {span / 1e3:.2f} ms, "
          f"idle {sum(g[0] for g in gaps) / 1e3:.2f} ms in {len(gaps)} gaps")
    for g in sorted(gaps, reverse=True)[:12]:
        print(f"  {g[0]:8.1f} us  after {g[1]}  before {g[2]}")
