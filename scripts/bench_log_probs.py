"""Per-token log-probs + entropy (RL) at a Qwen2.5-7B head: cutce vs materialized logits.

    PYTHONPATH=src python scripts/bench_log_probs.py [--shape 16384,3584,152064] [--temperature 0.9]

Providers: cutce.linear_log_probs(return_entropy=True); torch eager
`log_softmax((h @ w.T).float() / T)` + gather + entropy; torch.compile of the same. Measures
forward and forward+backward (upstream gradients on both log-probs and entropy) as ratios to one
bf16 matmul, peak memory above the inputs (gradients included), and the relative error of
log-probs, entropy, dE and dC against cutce's float32 torch path on upcast inputs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import cutce  # noqa: E402
from gpu_check import make_data, peak_mb, rel, timeit  # noqa: E402


def eager(h, w, t, temperature):
    lp = torch.log_softmax((h @ w.T).float() / temperature, dim=-1)
    logp = lp.gather(-1, t[:, None])[:, 0]
    ent = -(lp.exp() * lp).sum(-1)
    return logp, ent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="16384,3584,152064")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    n, d, v = map(int, args.shape.split(","))
    T = args.temperature
    h, w, t = make_data("zipf", n, d, v, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)
    g1 = torch.randn(n, device="cuda", generator=g)
    g2 = torch.randn(n, device="cuda", generator=g)
    providers = {
        "cutce": lambda a, c: cutce.linear_log_probs(a, c, t, temperature=T, return_entropy=True),
        "torch-eager": lambda a, c: eager(a, c, t, T),
        "torch-compile": torch.compile(lambda a, c: eager(a, c, t, T)),
    }

    def fwd_bwd(fn, a, c):
        a, c = a.detach().requires_grad_(), c.detach().requires_grad_()
        logp, ent = fn(a, c)
        da, dc = torch.autograd.grad((logp * g1 + ent * g2).sum(), (a, c))
        return logp.detach(), ent.detach(), da, dc

    ref = fwd_bwd(lambda a, c: cutce.linear_log_probs(a.float(), c.float(), t, temperature=T,
                                                      return_entropy=True, impl="torch"), h, w)
    mm = timeit(lambda: h @ w.T, args.reps)
    print(f"# log-probs + entropy, N={n} D={d} V={v}, bf16, T={T}: matmul {mm:.2f} ms; "
          f"grads {(n + v) * d * 2 / 2**20:.0f} MiB")
    print("| provider | fwd ms | fwd ratio | fwd+bwd ms | ratio | peak MiB | logp err | entropy err | dE err | dC err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, fn in providers.items():
        try:
            out = fwd_bwd(fn, h, w)
            errs = [rel(x, r) for x, r in zip(out, ref)]
            del out
            with torch.no_grad():
                f = timeit(lambda: fn(h, w), args.reps)
            fb = timeit(lambda: fwd_bwd(fn, h, w), args.reps)
            mem = peak_mb(lambda: fwd_bwd(fn, h, w))
            print(f"| {name} | {f:.1f} | {f / mm:.2f}x | {fb:.1f} | {fb / mm:.2f}x | {mem:.0f} | "
                  + " | ".join(f"{e:.1e}" for e in errs) + " |", flush=True)
        except Exception as e:  # e.g. out of memory: report and go on
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} |", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
