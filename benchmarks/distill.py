"""Distillation benchmark: cutce.linear_distillation_loss against materialized logits and peers.

    PYTHONPATH=src python benchmarks/distill.py --betas 0 --out bench-out   # H200: < 4 minutes a beta
    PYTHONPATH=src python benchmarks/distill.py --cpu-smoke                 # tiny, CPU, seconds

A Qwen2.5 7B -> 0.5B pair by default (teacher D=3584, student D=896, V=151936, N=8192 tokens,
bf16, frozen teacher, temperature 1, mean over tokens). Per beta (0 = forward KL, 0.5 = JSD:
the values both peers support, with the same convention as cutce) and provider, it measures
forward+backward time (median of --reps, CUDA events), peak memory above the inputs (gradients
included) and the relative error of the loss, dE and dC against cutce's torch path on float32
copies of the inputs (exact float32). Providers:

  cutce        linear_distillation_loss, impl="auto" (Triton kernels on CUDA); with
               --memory-budget 0 2 4 one row per budget instead ("cutce mb=4"; 0 = recompute)
  cutce-torch  linear_distillation_loss, impl="torch" (chunked, gradients formed in the forward)
  torch        eager: both heads' logits materialized (bf16 products, float32 formula)
  compile      torch.compile of the same function
  liger        liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (weight_soft_loss=1, no CE)
  liger-fljsd  liger_kernel.transformers.LigerFusedLinearJSD (its Triton JSD kernel; CUDA only)
  trl          trl.kernels.chunked_divergence.ChunkedDivergenceFunction (.mean() of its output)

A provider that cannot be imported, or fails (e.g. out of memory), gets a row saying why and the
run goes on; providers not started within --budget-s seconds are reported as skipped (first
calls compile: Triton kernels, torch.compile, Liger's compiled chunks; one beta per run keeps
each run well inside 4 minutes). Prints a Markdown table and writes
distill_<device>_beta<betas>.json under --out ({"benchmark": "distill", "meta", "rows"}).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import types

import torch

import cutce
from cutce.bench import measure, report


def materialized(hs, ws, ht, wt, beta, temperature):
    """The formula on dense logits (products in the inputs' dtype, the rest in float32)."""
    log_q = torch.log_softmax((hs @ ws.T).float() / temperature, dim=-1)
    log_p = torch.log_softmax((ht @ wt.T).float() / temperature, dim=-1)
    if beta == 0.0:
        d = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif beta == 1.0:
        d = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        d = beta * (log_p.exp() * (log_p - log_m)).sum(-1) \
            + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    return d.mean()


_TRL = []


def _import_trl():
    if not _TRL:
        _TRL.append(_import_trl_once())
    return _TRL[0]


def _import_trl_once():
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        return ChunkedDivergenceFunction, ""
    except ImportError as first:
        # trl.trainer.utils pulls in the trainer stack (pandas, datasets, ...) for one context
        # manager that gathers a ZeRO-3-partitioned head; with plain tensors it does nothing.
        import trl  # noqa: F401
        shim = types.ModuleType("trl.trainer.utils")
        shim.maybe_gather_lm_head_ctx = lambda *a, **k: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = shim
        try:
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        except ImportError:
            raise first from None
        # The stand-in does what the original does without ZeRO-3, so TRL's numbers are its own
        # and the row needs no note.
        return ChunkedDivergenceFunction, ""


def providers(args, device, labels):
    """name -> (factory returning fn(hs, ws, ht, wt, beta) -> scalar loss, or raising why not)."""
    T = args.temperature

    def cutce_fn(impl, budget=None):
        def factory():
            return (lambda hs, ws, ht, wt, beta: cutce.linear_distillation_loss(
                hs, ws, ht, wt, beta=beta, temperature=T, impl=impl, memory_budget=budget)), ""
        return factory

    def compiled():
        if device.type != "cuda" and not args.compile_on_cpu:
            raise RuntimeError("off on CPU (compiling takes minutes there; --compile-on-cpu)")
        fn = torch.compile(materialized)
        return (lambda hs, ws, ht, wt, beta: fn(hs, ws, ht, wt, beta, T)), ""

    def liger():
        from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDLoss
        cache = {}

        def fn(hs, ws, ht, wt, beta):
            if beta not in cache:
                cache[beta] = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                                      beta=beta, temperature=T,
                                                      compiled=device.type == "cuda")
            return cache[beta](hs, ws, ht, wt, labels)
        return fn, ""

    def liger_fljsd():
        if device.type != "cuda":
            raise RuntimeError("needs CUDA (Triton kernel)")
        from liger_kernel.transformers import LigerFusedLinearJSD
        return (lambda hs, ws, ht, wt, beta: LigerFusedLinearJSD(jsd_beta=beta, temperature=T)(
            hs, ws, ht, wt, None)), ""

    def trl():
        fn, note = _import_trl()
        return (lambda hs, ws, ht, wt, beta: fn.apply(hs, ws, None, ht, wt, None, beta, T)[0]
                .mean()), note

    # --memory-budget b1 b2 ...: one cutce row per budget ("cutce mb=b"; 0 = recompute kernels)
    budgets = {f"cutce mb={b:g}": cutce_fn("auto", b) for b in args.memory_budget or ()}
    return {**budgets, "cutce": cutce_fn("auto"), "cutce-torch": cutce_fn("torch"),
            "torch": lambda: ((lambda hs, ws, ht, wt, beta: materialized(hs, ws, ht, wt, beta, T)), ""),
            "compile": compiled, "liger": liger, "liger-fljsd": liger_fljsd, "trl": trl}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8192,896,3584,151936", help="N,Ds,Dt,V")
    ap.add_argument("--betas", default="0,0.5")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--providers", default="cutce,cutce-torch,trl,liger,liger-fljsd,torch,compile")
    ap.add_argument("--memory-budget", type=float, nargs="+", default=None,
                    help="cutce's memory_budget values, one row each in place of the default's "
                         "'cutce' row (0 = recompute kernels; default: the library's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="providers not started by then are skipped (the whole run stays < 4 min)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the logic")
    ap.add_argument("--compile-on-cpu", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.shape, args.reps, args.warmup = "64,32,48,300", 1, 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, ds, dt, v = map(int, args.shape.split(","))
    betas = [float(b) for b in args.betas.split(",")]
    t_start = time.perf_counter()

    g = torch.Generator(device=device).manual_seed(args.seed)
    # logits of std ~3 (student) and ~4 (teacher): peaked but not one-hot distributions
    hs = torch.randn(n, ds, device=device, generator=g).to(dtype)
    ht = torch.randn(n, dt, device=device, generator=g).to(dtype)
    ws = (torch.randn(v, ds, device=device, generator=g) * (3.0 / ds**0.5)).to(dtype)
    wt = (torch.randn(v, dt, device=device, generator=g) * (4.0 / dt**0.5)).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    grads_mib = (n + v) * ds * hs.element_size() / 2**20
    table = providers(args, device, labels)
    names = [p for p in args.providers.split(",") if p]
    if args.memory_budget:  # the budgets' rows replace the default's cutce row
        i = names.index("cutce") if "cutce" in names else 0
        names[i:i + ("cutce" in names)] = [k for k in table if k.startswith("cutce mb=")]
    rows = []
    print(f"# distillation N={n} Ds={ds} Dt={dt} V={v} {str(dtype)[6:]} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}); "
          f"frozen teacher, T={args.temperature}; student gradients {grads_mib:.0f} MiB")
    print("| beta | provider | fwd+bwd ms | peak MiB | peak / grads | loss err | dE err | dC err | note |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for beta in betas:
        a, c = hs.float().requires_grad_(), ws.float().requires_grad_()
        loss = cutce.linear_distillation_loss(a, c, ht.float(), wt.float(), beta=beta,
                                              temperature=args.temperature, impl="torch")
        ref = (loss.detach(), *torch.autograd.grad(loss, (a, c)))
        del a, c, loss
        for name in names:
            row = dict(beta=beta, provider=name, ms=None, peak_mib=None, loss_err=None, dE_err=None,
                       dC_err=None, status="ok", note="")
            rows.append(row)
            if time.perf_counter() - t_start > args.budget_s:
                row.update(status="skipped", note=f"time budget of {args.budget_s:.0f} s spent")
                _print(row, grads_mib)
                continue
            try:
                fn, row["note"] = table[name]()
            except Exception as e:  # not installed, needs CUDA, ...
                row.update(status="unavailable", note=f"{type(e).__name__}: {str(e)[:100]}")
                _print(row, grads_mib)
                continue
            try:
                measure.measure_head(fn, hs, ws, (ht, wt, beta), ref, device, args.warmup,
                                     args.reps, row)
            except Exception as e:  # e.g. out of memory: report and go on
                row.update(status="failed", note=f"{type(e).__name__}: {str(e)[:100]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            _print(row, grads_mib)
        del ref
    _write_json(rows, device, dtype, (n, ds, dt, v), grads_mib, args)
    print(f"# {time.perf_counter() - t_start:.0f} s")
    return rows


def _print(row, grads_mib):
    print(report.progress_row(f"{row['beta']:g}", row, grads_mib), flush=True)


def _write_json(rows, device, dtype, shape, grads_mib, args):
    betas = "_".join(f"{b:g}" for b in sorted({r["beta"] for r in rows}))
    path = os.path.join(args.out, f"distill_{device.type}_beta{betas}.json")
    meta = report.run_metadata(device)
    # The setting every row shares; each row keeps its beta.
    setting = dict(n=shape[0], ds=shape[1], dt=shape[2], v=shape[3], dtype=str(dtype)[6:],
                   temperature=args.temperature, grads_mib=grads_mib, warmup=args.warmup,
                   repeats=args.reps)
    report.write_json(path, "distill", meta, [dict(setting, **r) for r in rows])
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
