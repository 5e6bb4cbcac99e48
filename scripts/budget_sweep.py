"""Time and peak memory of cutce's exact loss against its memory budget, on the GPU.

For each shape, fwd+bwd of ``linear_cross_entropy(..., memory_budget=b)`` for several budgets
(0 = the recompute strategy), as a ratio to one cuBLAS matmul of the same shape, with peak
memory over the gradients' size and dE/dC errors against the float32 reference (same harness as
``cutce bench``). Writes $OUT/budget_sweep.csv; docs/benchmarks.md plots it beside the peers.

    PYTHONPATH=src python scripts/budget_sweep.py [--shapes gemma2-2b,llama3-8b,...] [--budgets 0,1,2,3]
"""

from __future__ import annotations

import argparse
import csv
import os

import torch

import cutce
from cutce import plan
from cutce.bench import data, measure, report


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="gemma2-2b,llama3-8b,16384,4096,32768")
    p.add_argument("--budgets", default="0,1,2,3")
    p.add_argument("--data", default="zipf")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    # "16384,4096,32768" is one custom shape: split on names or N,D,V triples
    items, shapes = args.shapes.split(","), []
    while items:
        if items[0] in data.SHAPES:
            shapes.append(data.parse_shape(items.pop(0)))
        else:
            shapes.append(data.parse_shape(",".join(items[:3])))
            items = items[3:]
    budgets = [float(b) for b in args.budgets.split(",")]
    out = os.environ.get("OUT", "bench-out")
    os.makedirs(out, exist_ok=True)
    rows = []
    dev = torch.device("cuda")
    print("| shape | budget | plan | fwd+bwd ms | x matmul | peak MiB | peak / grads | dE err | dC err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        h, w, t = data.make_inputs(shape, args.data, torch.bfloat16, dev, 0)
        ref = measure.reference(h, w, t)
        mm = measure.matmul_ms(h, w, torch.bfloat16, repeats=args.repeats)
        grads = report.gradients_mb(shape.n, shape.d, shape.v, "bf16")
        for b in budgets:
            pl = plan.plan(shape.n, shape.v, shape.d, torch.bfloat16, "triton", True, b)
            desc = f"fused x{pl.chunk_n}" if pl.fused else "recompute"
            res = measure.measure(lambda a, c, tt, b=b: cutce.linear_cross_entropy(
                a, c, tt, impl="triton", memory_budget=b), h, w, t, ref, warmup=2,
                repeats=args.repeats, mode="fwd-bwd")
            row = dict(shape=shape.name, n=shape.n, d=shape.d, v=shape.v, budget=b, plan=desc,
                       fwdbwd_ms=res.fwdbwd_ms, ratio=(res.fwdbwd_ms or 0) / mm,
                       peak_mb=res.peak_mb, grads_mb=grads, de_err=res.de_err, dc_err=res.dc_err,
                       matmul_ms=mm, errors="; ".join(res.errors))
            rows.append(row)
            print(f"| {shape} | {b:g} | {desc} | {res.fwdbwd_ms or float('nan'):.2f} | "
                  f"{row['ratio']:.2f} | {res.peak_mb or float('nan'):.0f} | "
                  f"{(res.peak_mb or 0) / grads:.2f} | {res.de_err or float('nan'):.2e} | "
                  f"{res.dc_err or float('nan'):.2e} | {row['errors']}", flush=True)
        del h, w, t, ref
        measure.free_memory(dev)
    with open(os.path.join(out, "budget_sweep.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main()
