"""Kernel-level time split of one fwd+bwd (torch.profiler), for docs/perf-notes.md.

    PYTHONPATH=src python scripts/profile_bwd.py [--shape 8192,2304,256000] [--budget B] [--gaps] [--host]

--host times the Python side of a call (the GPU waits for it before the first kernel) and lists
the functions it spends that time in (cProfile).
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
ap.add_argument("--host", action="store_true", help="host (Python) time per call and its top functions")
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
if args.host:
    import cProfile
    import pstats
    import time
    fw, bw = [], []
    for _ in range(5):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = cutce.linear_cross_entropy(h, w, t, impl="triton", **kw)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        fw.append((t1 - t0) * 1e3)
        bw.append((t2 - t1) * 1e3)
    print(f"host time (median of 5, no sync inside): forward call {sorted(fw)[2]:.2f} ms, "
          f"backward call {sorted(bw)[2]:.2f} ms")
    torch.cuda.synchronize()
    prof_h = cProfile.Profile()
    prof_h.enable()
    for _ in range(3):
        h.grad = w.grad = None
        cutce.linear_cross_entropy(h, w, t, impl="triton", **kw).backward()
    prof_h.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof_h).sort_stats("tottime").print_stats(25)
    # The host timeline of one forward call from an idle GPU: when each op started (ms after
    # the call), how long its host side took, and when the first kernel launch happened.
    h.grad = w.grad = None
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof_c:
        with torch.profiler.record_function("CALL"):
            loss = cutce.linear_cross_entropy(h, w, t, impl="triton", **kw)
    loss.backward()
    torch.cuda.synchronize()
    evs = sorted(prof_c.events(), key=lambda e: e.time_range.start)
    t0 = next(e.time_range.start for e in evs if e.name == "CALL")
    print("host timeline of the forward call (start ms, host ms, op):")
    for e in evs:
        if e.name != "CALL" and e.cpu_parent is not None and e.cpu_parent.name in ("CALL",) \
                or e.name.startswith(("cuda", "cu")) or e.time_range.elapsed_us() > 150:
            print(f"  {(e.time_range.start - t0) / 1e3:7.3f} {e.time_range.elapsed_us() / 1e3:7.3f}  {e.name[:70]}")
