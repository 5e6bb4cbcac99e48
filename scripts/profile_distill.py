"""Kernel-level time split of one fused distillation fwd+bwd (torch.profiler), for
docs/distillation.md: which kernels the JSD's / forward KL's time goes to.

    PYTHONPATH=src python scripts/profile_distill.py [--beta 0.5] [--shape 8192,896,3584,151936]

The inputs are random (bf16, hidden ~ N(0, 1), heads scaled by 3/sqrt(Ds) and 4/sqrt(Dt), as
in scripts/bench_distill.py). Prints the kernels by total CUDA time (per call) and the wall
time; --launches also lists one call's kernels in order.
"""
import argparse

import torch

import cutce

ap = argparse.ArgumentParser()
ap.add_argument("--beta", type=float, default=0.5)
ap.add_argument("--shape", default="8192,896,3584,151936", help="N,Ds,Dt,V")
ap.add_argument("--budget", type=float, default=None)
ap.add_argument("--calls", type=int, default=3)
ap.add_argument("--launches", action="store_true",
                help="also list one call's kernels in launch order with their times (the dz\n"
                "kernel's two JSD passes share a name)")
args = ap.parse_args()
if not torch.cuda.is_available():
    raise SystemExit("profile_distill.py: needs a CUDA device (it profiles the Triton kernels)")
n, ds, dt, v = map(int, args.shape.split(","))
g = torch.Generator("cuda").manual_seed(0)
hs = torch.randn(n, ds, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
ws = (torch.randn(v, ds, device="cuda", generator=g) * (3 / ds ** 0.5)).bfloat16().requires_grad_()
ht = torch.randn(n, dt, device="cuda", generator=g, dtype=torch.bfloat16)
wt = (torch.randn(v, dt, device="cuda", generator=g) * (4 / dt ** 0.5)).bfloat16()


def call():
    cutce.linear_distillation_loss(hs, ws, ht, wt, beta=args.beta,
                                   memory_budget=args.budget).backward()


for _ in range(2):
    call()
torch.cuda.synchronize()
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
e0.record()
for _ in range(args.calls):
    call()
e1.record()
torch.cuda.synchronize()
print(f"# beta={args.beta} shape={args.shape}: wall {e0.elapsed_time(e1) / args.calls:.2f} ms per call")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()
rows = []
for ev in prof.key_averages():
    t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
    if t > 0:
        rows.append((t / 1e3 / args.calls, ev.count // args.calls, ev.key))
rows.sort(reverse=True)
total = sum(r[0] for r in rows)
print(f"# GPU busy {total:.2f} ms per call")
print("| ms per call | launches | kernel |\n|---:|---:|---|")
for t, c, k in rows[:20]:
    print(f"| {t:.2f} | {c} | {k[:110]} |")
if args.launches:
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print("| launch | ms | kernel |\n|---:|---:|---|")
    for i, e in enumerate(kernels[: len(kernels) // args.calls]):
        if e.device_time_total > 50:  # microseconds: skip the small torch ops
            print(f"| {i} | {e.device_time_total / 1e3:.2f} | {e.name[:60]} |")
