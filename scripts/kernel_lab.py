"""Sweep kernel variants (tile, TMA loads, loop flattening, persistent dz, chunk width) in one call.

    PYTHONPATH=src python scripts/kernel_lab.py [--shape gemma] [--fwd] [--bwd] [--variants ...]

Each variant is a set of the tuning knobs of cutce.triton.configs (env CUTCE_* and module
attributes), so what is measured is the library's own code path. Prints ms, ratio to one bf16
matmul, and the dE/dC difference to the first variant (a broken variant shows up there).
For tuning only; results go to docs/perf-notes.md by hand.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import cutce  # noqa: E402
from cutce.triton import backward as tbwd  # noqa: E402
from cutce.triton import configs  # noqa: E402
from gpu_check import SHAPES, make_data, rel, timeit  # noqa: E402

NEW = dict(CUTCE_FWD_TILE="128,256,64,8,3", CUTCE_TMA="1", CUTCE_FLATTEN="1",
           CUTCE_DZ_PROGRAMS_PER_SM="1", CUTCE_ZT_IN_KERNEL="0", MAX_CHUNK_V=8192)
# name: knobs changed from NEW (CUTCE_* are environment variables, the rest configs attributes)
VARIANTS = {
    "v1": dict(CUTCE_TMA="0", CUTCE_FLATTEN="0", CUTCE_DZ_PROGRAMS_PER_SM="0", MAX_CHUNK_V=0),
    "new": {},
    "zt-kernel": dict(CUTCE_ZT_IN_KERNEL="1"),
    "chunk4k": dict(MAX_CHUNK_V=4096),
    "chunk16k": dict(MAX_CHUNK_V=16384),
    "dz-per-tile": dict(CUTCE_DZ_PROGRAMS_PER_SM="0"),
    "no-flatten": dict(CUTCE_FLATTEN="0"),
    "256x128": dict(CUTCE_FWD_TILE="256,128,64,8,3"),
    "group-all": dict(CUTCE_GROUP_ROWS="0"),
}


def apply(changes):
    knobs = {**NEW, **changes}
    for k, val in knobs.items():
        if k.startswith("CUTCE_"):
            os.environ[k] = val
        else:
            setattr(configs, k, val)
    os.environ["CUTCE_BWD_TILE"] = os.environ["CUTCE_FWD_TILE"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma2-2b")
    ap.add_argument("--data", default="zipf")
    ap.add_argument("--variants", default="v1,new,zt-kernel,chunk4k,chunk16k,dz-per-tile")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--filtered", action="store_true", help="also time filter_eps='auto'")
    args = ap.parse_args()
    n, d, v = SHAPES.get(args.shape) or tuple(map(int, args.shape.split(",")))
    h, w, t = make_data(args.data, n, d, v, torch.bfloat16)
    mm = timeit(lambda: h @ w.T)
    print(f"{args.shape} {args.data} N={n} D={d} V={v}: matmul {mm:.2f} ms", flush=True)
    first = None
    for name in args.variants.split(","):
        apply(VARIANTS[name])
        try:
            with torch.no_grad():
                f = timeit(lambda: cutce.linear_cross_entropy(h, w, t, impl="triton"))
            line = f"{name:>22}: fwd {f:6.2f} ms {f / mm:5.3f}x"
            if not args.no_bwd:
                hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()

                def step():
                    hg.grad = wg.grad = None
                    cutce.linear_cross_entropy(hg, wg, t, impl="triton").backward()
                fb = timeit(step, reps=5, warm=2)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                host = (time.perf_counter() - t0) * 1e3  # enqueue time: > GPU time = CPU-bound
                torch.cuda.synchronize()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                got = (hg.grad.clone(), wg.grad.clone())
                if first is None:
                    first = got
                diff = f"dE {rel(got[0], first[0]):.1e} dC {rel(got[1], first[1]):.1e}"
                line += (f" | fwd+bwd {fb:6.2f} ms {fb / mm:5.3f}x (host {host:5.1f} ms) peak "
                         f"{peak:6.0f} MiB | vs first {diff}")
                hg.grad = wg.grad = None
                if args.filtered:
                    kept = []
                    real = tbwd._kept_classes
                    tbwd._kept_classes = lambda *a: kept.append(real(*a)) or kept[-1]

                    def fstep():
                        hg.grad = wg.grad = None
                        cutce.linear_cross_entropy(hg, wg, t, impl="triton",
                                                   filter_eps="auto").backward()
                    ff = timeit(fstep, reps=5, warm=2)
                    tbwd._kept_classes = real
                    line += (f" | filtered {ff:6.2f} ms {ff / mm:5.3f}x kept "
                             f"{kept[-1].numel() / v:.1%} dE {rel(hg.grad, got[0]):.2e}")
                    hg.grad = wg.grad = None
            print(line, flush=True)
        except Exception as e:
            print(f"{name:>22}: failed {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
