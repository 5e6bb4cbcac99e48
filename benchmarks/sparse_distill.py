"""Distillation from a stored top-K teacher: cutce.linear_sparse_distillation_loss against the
student's materialized logits + F.kl_div, eager and compiled.

    PYTHONPATH=src python benchmarks/sparse_distill.py --out bench-out      # one GPU
    PYTHONPATH=src python benchmarks/sparse_distill.py --cpu-smoke          # tiny, CPU, seconds

A Qwen2.5-7B head by default (N=16384 tokens, D=3584, V=152064, K=64 stored ids per token,
bf16, temperature 1, mean over tokens). The teacher's top-K comes from a random teacher head
(D=512), computed once in chunks; every token keeps all K ids. Per tail ("drop", "renormalize",
"bucket") and provider it measures forward+backward time (median of --reps, CUDA events), peak
memory above the inputs (gradients included) and the relative error of the loss, dE and dC
against cutce's torch path on float32 copies of the inputs (exact float32). Providers:

  cutce        linear_sparse_distillation_loss, impl="auto" (Triton kernels on CUDA)
  cutce-torch  linear_sparse_distillation_loss, impl="torch"
  torch        eager: the student's N x V logits (bf16 product), log_softmax, gather at the
               ids, F.kl_div(log_target=True) in float32
  compile      torch.compile of the same function (off on CPU unless --compile-on-cpu)
  cutce-ce     the yardstick: cutce.linear_cross_entropy at the same shape (the teacher's top-1
               as targets; one row, no tail, no errors)

A provider that fails (e.g. out of memory) gets a row saying why and the run goes on. Prints a
Markdown table and writes sparse_distill_<device>.json under --out
({"benchmark": "sparse_distill", "meta", "rows"}).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import cutce
from cutce.bench import measure, report

TAILS = ("drop", "renormalize", "bucket")


def materialized(h, w, ids, lp, tail, temperature):
    """The loss from the student's dense logits, as a PyTorch user writes it (every id kept)."""
    log_q = torch.log_softmax((h @ w.T).float() / temperature, dim=-1)
    lq = log_q.gather(-1, ids)
    lp = lp.float()
    if tail == "renormalize":
        lq = lq - torch.logsumexp(lq, -1, keepdim=True)
        lp = lp - torch.logsumexp(lp, -1, keepdim=True)
    d = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    if tail == "bucket":
        r = (1.0 - lp.exp().sum(-1)).clamp(min=0.0)
        rest = torch.log1p(-lq.exp().sum(-1))
        d = d + torch.where(r > 0, r * (torch.log(r) - rest), 0.0)
    return d.mean()


def teacher_top_k(n, v, k, temperature, device, g, chunk=2048):
    """Ids and log-probs of a random teacher's top-K per token (logits of std ~4)."""
    dt = 512
    ht = torch.randn(n, dt, device=device, generator=g)
    wt = torch.randn(v, dt, device=device, generator=g) * (4.0 / dt**0.5)
    ids = torch.empty(n, k, dtype=torch.long, device=device)
    lps = torch.empty(n, k, device=device)
    for s in range(0, n, chunk):
        lp = torch.log_softmax(ht[s:s + chunk] @ wt.T / temperature, dim=-1)
        lps[s:s + chunk], ids[s:s + chunk] = lp.topk(k, dim=-1)
    return ids, lps


def providers(args, device):
    """name -> factory returning fn(h, w, ids, lp, tail) -> scalar loss (or raising why not)."""
    T = args.temperature

    def cutce_fn(impl):
        return lambda: (lambda h, w, ids, lp, tail: cutce.linear_sparse_distillation_loss(
            h, w, ids, lp, tail=tail, temperature=T, impl=impl))

    def compiled():
        if device.type != "cuda" and not args.compile_on_cpu:
            raise RuntimeError("off on CPU (compiling takes minutes there; --compile-on-cpu)")
        fn = torch.compile(materialized)
        return lambda h, w, ids, lp, tail: fn(h, w, ids, lp, tail, T)

    return {"cutce": cutce_fn("auto"), "cutce-torch": cutce_fn("torch"),
            "torch": lambda: (lambda h, w, ids, lp, tail: materialized(h, w, ids, lp, tail, T)),
            "compile": compiled}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="16384,3584,152064,64", help="N,D,V,K")
    ap.add_argument("--tails", default="drop,renormalize,bucket")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--providers", default="cutce,torch,compile,cutce-ce")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the logic")
    ap.add_argument("--compile-on-cpu", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.shape, args.reps, args.warmup = "64,32,300,8", 1, 0
        args.providers = args.providers.replace("compile", "cutce-torch")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, d, v, k = map(int, args.shape.split(","))
    tails = [t for t in args.tails.split(",") if t]
    if any(t not in TAILS for t in tails):
        ap.error(f"--tails: expected names from {TAILS}, got {args.tails!r}")
    t_start = time.perf_counter()

    g = torch.Generator(device=device).manual_seed(args.seed)
    h = torch.randn(n, d, device=device, generator=g).to(dtype)
    w = (torch.randn(v, d, device=device, generator=g) * (3.0 / d**0.5)).to(dtype)
    ids, lp = teacher_top_k(n, v, k, args.temperature, device, g)
    grads_mib = (n + v) * d * h.element_size() / 2**20
    table = providers(args, device)
    names = [p for p in args.providers.split(",") if p]
    rows = []
    print(f"# sparse distillation N={n} D={d} V={v} K={k} {str(dtype)[6:]} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}); "
          f"T={args.temperature}; student gradients {grads_mib:.0f} MiB")
    print("| tail | provider | fwd+bwd ms | peak MiB | peak / grads | loss err | dE err | dC err | note |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for tail in tails:
        a, c = h.float().requires_grad_(), w.float().requires_grad_()
        loss = cutce.linear_sparse_distillation_loss(a, c, ids, lp, tail=tail,
                                                     temperature=args.temperature, impl="torch")
        ref = (loss.detach(), *torch.autograd.grad(loss, (a, c)))
        del a, c, loss
        for name in (x for x in names if x != "cutce-ce"):
            row = dict(tail=tail, provider=name, ms=None, peak_mib=None, loss_err=None,
                       dE_err=None, dC_err=None, status="ok", note="")
            rows.append(row)
            try:
                fn = table[name]()
            except Exception as e:  # needs CUDA, ...
                row.update(status="unavailable", note=f"{type(e).__name__}: {str(e)[:100]}")
                _print(row, grads_mib)
                continue
            try:
                measure.measure_head(fn, h, w, (ids, lp, tail), ref, device, args.warmup,
                                     args.reps, row)
            except Exception as e:  # e.g. out of memory: report and go on
                row.update(status="failed", note=f"{type(e).__name__}: {str(e)[:100]}")
            measure.free_memory(device)
            _print(row, grads_mib)
        del ref
    if "cutce-ce" in names:
        row = dict(tail="-", provider="cutce-ce", ms=None, peak_mib=None, loss_err=None,
                   dE_err=None, dC_err=None, status="ok", note="")
        rows.append(row)
        t = ids[:, 0].contiguous()

        def step():
            a, c = h.detach().requires_grad_(), w.detach().requires_grad_()
            return torch.autograd.grad(cutce.linear_cross_entropy(a, c, t), (a, c))

        row["ms"] = measure.median_ms(step, device, args.warmup, args.reps)
        row["peak_mib"] = measure.peak_extra_mb(step, device)
        _print(row, grads_mib)
    setting = dict(n=n, d=d, v=v, k=k, dtype=str(dtype)[6:], temperature=args.temperature,
                   grads_mib=grads_mib, warmup=args.warmup, repeats=args.reps)
    path = report.write_json(os.path.join(args.out, f"sparse_distill_{device.type}.json"),
                             "sparse_distill", report.run_metadata(device),
                             [dict(setting, **r) for r in rows])
    print(f"# wrote {path}")
    print(f"# {time.perf_counter() - t_start:.0f} s")
    return rows


def _print(row, grads_mib):
    print(report.progress_row(row["tail"], row, grads_mib), flush=True)


if __name__ == "__main__":
    main()
