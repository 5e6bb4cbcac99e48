"""One call on the GPU: correctness at real shapes, determinism, and timing against one matmul.

    PYTHONPATH=src python scripts/gpu_check.py [--quick] [--shapes gemma2-2b,llama3-8b]

Correctness: relative error of loss, dE, dC of impl="triton" (exact and filtered) and of torch eager
bf16, both against cutce's chunked float32 torch path on float32 copies of the same inputs.
Timing: median CUDA-event times, as a ratio to one bf16 cuBLAS matmul of the same N x D x V.
Prints one table; timings never decide pass/fail.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import cutce
from cutce.bench import data as bench_data

SHAPES = {"gemma2-2b": (8192, 2304, 256000), "llama3-8b": (8192, 4096, 128256)}


def make_data(kind, n, d, v, dtype, seed=0):
    """The bench's data kinds (cutce.bench.data), on the GPU."""
    return bench_data.make_inputs(bench_data.Shape("check", n, d, v), kind, dtype, "cuda", seed)


def timeit(fn, reps=10, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def grads(loss_fn, h, w):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = loss_fn(h, w)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), dh, dw


def peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def run_shape(name, kind, n, d, v, reps):
    h, w, t = make_data(kind, n, d, v, torch.bfloat16)
    ref = grads(lambda a, b: cutce.linear_cross_entropy(a.float(), b.float(), t, impl="torch"), h, w)
    providers = {
        "cutce-triton": lambda a, b: cutce.linear_cross_entropy(a, b, t, impl="triton"),
        "cutce-filtered": lambda a, b: cutce.linear_cross_entropy(a, b, t, impl="triton", filter_eps="auto"),
        "torch-eager": lambda a, b: F.cross_entropy((a @ b.T).float(), t),
    }
    mm = timeit(lambda: h @ w.T, reps)
    rows = []
    for pname, fn in providers.items():
        try:
            loss, dh, dw = grads(fn, h, w)
            errs = (rel(loss, ref[0]), rel(dh, ref[1]), rel(dw, ref[2]))
            del dh, dw
            with torch.no_grad():
                f_ms = timeit(lambda: fn(h, w), reps)
            hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()

            def step():
                hg.grad = wg.grad = None
                fn(hg, wg).backward()
                return None

            fb_ms = timeit(step, reps)
            hg.grad = wg.grad = None
            mem = peak_mb(step)
            rows.append((name, kind, pname, f_ms, f_ms / mm, fb_ms, fb_ms / mm, mem) + errs)
        except Exception as e:  # a provider that fails (e.g. OOM) is reported, the run goes on
            rows.append((name, kind, pname, float("nan"), float("nan"), float("nan"), float("nan"),
                         float("nan"), float("nan"), float("nan"), float("nan")))
            print(f"{pname} failed: {type(e).__name__}: {e}", file=sys.stderr)
        torch.cuda.empty_cache()
    print(f"# {name} {kind} N={n} D={d} V={v}: matmul {mm:.2f} ms; grads {((n + v) * d * 2) / 2**20:.0f} MiB")
    for r in rows:
        print("%-10s %-5s %-15s fwd %7.2f ms %5.2fx | fwd+bwd %7.2f ms %5.2fx | %8.0f MiB | loss %.1e dE %.1e dC %.1e" % r)
    sys.stdout.flush()
    return rows


def determinism(n=4096, d=2304, v=65536):
    h, w, t = make_data("zipf", n, d, v, torch.bfloat16, seed=3)
    outs = [grads(lambda a, b: cutce.linear_cross_entropy(a, b, t, impl="triton"), h, w) for _ in range(2)]
    same = all(torch.equal(a, b) for a, b in zip(*outs))
    print(f"determinism (two runs bitwise equal): {same}")
    return same


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="gemma2-2b,llama3-8b")
    ap.add_argument("--kinds", default="zipf,flat")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton",
          __import__("triton").__version__, time.strftime("%Y-%m-%d"))
    determinism()
    for s in args.shapes.split(","):
        n, d, v = SHAPES[s] if s in SHAPES else map(int, s.split("x"))
        for kind in args.kinds.split(","):
            run_shape(s, kind, n, d, v, args.reps)


if __name__ == "__main__":
    main()
