"""Host (Python) time of one fused distillation call, by function (cProfile), for finding what
the GPU waits for before the first kernel when a call starts from an idle GPU (every benchmark
step; a training loop that runs ahead hides it).

    PYTHONPATH=src python scripts/host_distill.py [--beta 0] [--shape 8192,896,3584,151936]

Prints the wall time of the forward call alone (host, the kernels queued but not waited for),
of forward + backward with a sync, and cProfile's top functions by own time over 20 calls.
"""
import argparse
import cProfile
import pstats
import time

import torch

import cutce

ap = argparse.ArgumentParser()
ap.add_argument("--beta", type=float, default=0.0)
ap.add_argument("--shape", default="8192,896,3584,151936", help="N,Ds,Dt,V")
ap.add_argument("--calls", type=int, default=20)
args = ap.parse_args()
if not torch.cuda.is_available():
    raise SystemExit("host_distill.py: needs a CUDA device")
n, ds, dt, v = map(int, args.shape.split(","))
g = torch.Generator("cuda").manual_seed(0)
hs = torch.randn(n, ds, device="cuda", generator=g, dtype=torch.bfloat16)
ws = (torch.randn(v, ds, device="cuda", generator=g) * (3 / ds ** 0.5)).bfloat16()
ht = torch.randn(n, dt, device="cuda", generator=g, dtype=torch.bfloat16)
wt = (torch.randn(v, dt, device="cuda", generator=g) * (4 / dt ** 0.5)).bfloat16()


def call(timed=None):
    a, c = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    t0 = time.perf_counter()
    loss = cutce.linear_distillation_loss(a, c, ht, wt, beta=args.beta)
    t1 = time.perf_counter()
    loss.backward()
    torch.cuda.synchronize()
    if timed is not None:
        timed.append(((t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3))


# the host time from the call's start to the first statistics kernel's launch: the GPU, idle
# before the call, waits that long (the prologue: validation, plan, custom op, allocations)
from cutce.triton import distill_fused as _kf  # noqa: E402

_real = _kf._stats_kernel
_first = []


class _Spy:
    def __getitem__(self, grid):
        launch = _real[grid]

        def run(*a, **k):
            if not _first:
                _first.append(time.perf_counter())
            return launch(*a, **k)
        return run


_kf._stats_kernel = _Spy()
pro = []
for i in range(3 + args.calls):
    _first.clear()
    t0 = time.perf_counter()
    call()
    if i >= 3:
        pro.append((_first[0] - t0) * 1e3)
print(f"# prologue (call start -> first statistics kernel launched): "
      f"{sorted(pro)[len(pro) // 2]:.2f} ms median, min {min(pro):.2f}")
_kf._stats_kernel = _real
times = []
for _ in range(args.calls):
    call(times)
fwd = sorted(t[0] for t in times)[len(times) // 2]
tot = sorted(t[1] for t in times)[len(times) // 2]
print(f"# beta={args.beta} shape={args.shape}: forward call (host) {fwd:.2f} ms, "
      f"fwd+bwd with sync {tot:.2f} ms (medians of {args.calls})")
prof = cProfile.Profile()
prof.enable()
for _ in range(args.calls):
    call()
prof.disable()
st = pstats.Stats(prof)
st.sort_stats("tottime").print_stats(25)
