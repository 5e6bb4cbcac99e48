"""Where the host time of one training call goes before the GPU gets its first large kernel
(the GPU idles for it in a benchmark that starts each call from an idle GPU).

    PYTHONPATH=src python scripts/host_stages.py [--shape 8192,2304,256000]

Prints the host milliseconds of each stage of a fwd call (no sync inside), the cost of a lone
tiny CUDA op right after a sync, and the call with Python's garbage collector off.
"""
import argparse
import collections
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import cutce  # noqa: E402
from cutce import api, loss, ops  # noqa: E402
from cutce.triton import fused, rows  # noqa: E402
from gpu_check import make_data  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="8192,2304,256000")
args = ap.parse_args()
n, d, v = map(int, args.shape.split(","))
h, w, t = make_data("zipf", n, d, v, torch.bfloat16)
h.requires_grad_()
w.requires_grad_()
T = collections.defaultdict(list)


def timed(mod, name):
    f = getattr(mod, name)

    def g(*a, **k):
        t0 = time.perf_counter()
        r = f(*a, **k)
        T[f"{mod.__name__}.{name}"].append((time.perf_counter() - t0) * 1e3)
        return r
    setattr(mod, name, g)


for mod, name in [(api, "_check_targets"), (api, "_check_flag"), (rows, "row_coefs"),
                  (api, "prepare"), (api, "_check_tensors"),
                  (api, "_autocast"), (loss, "row_coefs"), (ops, "fused_loss"),
                  (fused, "fused_loss"), (fused, "target_logits"), (fused, "_launch"),
                  (api.distributed, "resolve_vocab_parallel")]:
    timed(mod, name)


def step():
    h.grad = w.grad = None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = cutce.linear_cross_entropy(h, w, t, impl="triton")
    T["whole forward call"].append((time.perf_counter() - t0) * 1e3)
    out.backward()
    torch.cuda.synchronize()


for _ in range(3):
    step()
T.clear()
for _ in range(7):
    step()
print("host ms per stage (median of 7; nested stages include their children):")
for k, xs in T.items():
    xs = sorted(xs)
    per = len(xs) // 7
    print(f"  {k:45s} {xs[len(xs) // 2]:8.3f}  (x{per} per call)")
tiny = []
for _ in range(7):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _ = t < 0
    tiny.append((time.perf_counter() - t0) * 1e3)
print(f"a lone `targets < 0` right after a sync: {sorted(tiny)[3]:.3f} ms (all: "
      f"{', '.join(f'{x:.3f}' for x in tiny)})")
T.clear()
gc.disable()
for _ in range(7):
    step()
gc.enable()
print(f"whole forward call with gc off: {sorted(T['whole forward call'])[3]:.3f} ms")
