"""Log-probs + entropy of a truncated sampler's distribution (top_k / top_p / min_p): cutce's
truncated path against its own untruncated call (the yardstick) and materialized logits.

    PYTHONPATH=src python benchmarks/truncated.py --out bench-out      # one GPU
    PYTHONPATH=src python benchmarks/truncated.py --cpu-smoke          # tiny sizes on CPU, seconds

A Qwen2.5-7B head by default (N=16384 tokens, D=3584, V=152064, bf16, temperature 0.9,
trained-model-like data: cutce.bench.data "zipf"). Each provider computes per-token log-probs
and entropy; forward+backward is of ``(logp * g1 + entropy * g2).sum()`` (random per-token
upstream gradients; a dropped token's -inf log-prob counts 0). Providers:

  cutce                    linear_log_probs, no truncation (Triton on CUDA): the yardstick
  cutce <trunc>            linear_log_probs with the truncation (its torch path)
  torch-eager <trunc>      float32 logits of h @ w.T, the kept set (min-p, top-k, top-p in that
                           order, top-p by an ascending sort as the sampler), masked log_softmax
  torch-compile <trunc>    torch.compile of the same function (inductor; aot_eager on CPU)

with <trunc> one of top_k=64, top_p=0.9, min_p=0.05, top_k=64+top_p=0.9. For each: forward and
forward+backward time (median of --reps, after --warmup), their ratio to the yardstick's,
peak memory above the inputs (gradients included; CUDA only) and the relative error (norm of
the difference / norm) of logp, entropy, dE, dC against float64 materialized logits of the
same truncation, token chunk by token chunk; for a truncated row, the mean size of a token's
kept set there ("kept ids": cutce's backward works from lists of them up to 256 a token on
average, and recomputes the logits past that). A provider that fails (e.g. out of memory) gets a
row saying why and the run goes on. Prints a Markdown table and writes truncated_<device>.json
under --out ({"benchmark": "truncated", "meta", "rows"}).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch

import cutce
from cutce.bench import measure
from cutce.bench import report as results
from cutce.bench.data import Shape, make_inputs
from page_format import ratio

START = time.perf_counter()
TRUNCATIONS = {"top_k=64": dict(top_k=64), "top_p=0.9": dict(top_p=0.9),
               "min_p=0.05": dict(min_p=0.05), "top_k=64+top_p=0.9": dict(top_k=64, top_p=0.9)}
DEFAULT_PROVIDERS = ("cutce", "torch-eager top_k=64", "torch-eager top_p=0.9",
                     "torch-compile top_k=64", "torch-compile top_p=0.9")
FIELDS = ["provider", "truncation", "kept_mean", "n", "d", "v", "dtype", "temperature", "fwd_ms",
          "fwd_ratio",
          "fwd_bwd_ms", "fwd_bwd_ratio", "peak_mib", "logp_err", "entropy_err", "dE_err",
          "dC_err", "note"]


@torch.no_grad()
def kept(z, top_k=None, top_p=None, min_p=None):
    """The sampler's kept set of logits z (rows): min-p, then top-k, then top-p."""
    keep = torch.ones_like(z, dtype=torch.bool)
    if min_p is not None:
        p = torch.softmax(z, dim=-1)
        keep &= p >= p.amax(-1, keepdim=True) * min_p
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z.masked_fill(~keep, -math.inf), top_k, dim=-1).values[:, -1:]
        keep &= z >= kth
    if top_p is not None:
        srt = torch.sort(z.masked_fill(~keep, -math.inf), dim=-1).values
        cum = torch.softmax(srt, dim=-1).cumsum(-1)
        first = (cum <= 1.0 - top_p).sum(-1, keepdim=True).clamp(max=z.shape[-1] - 1)
        keep &= z >= srt.gather(-1, first)
    return keep


def eager(h, w, t, temperature, trunc, dtype=torch.float32, sizes=None):
    """(logp, entropy) from materialized logits; appends each token's kept-set size to
    ``sizes`` where given."""
    z = (h @ w.T).to(dtype) / temperature
    keep = kept(z, **trunc)
    if sizes is not None:
        sizes.append(keep.sum(-1))
    lsm = z.masked_fill(~keep, -math.inf).log_softmax(-1)
    logp = lsm.gather(-1, t[:, None])[:, 0]
    return logp, -(lsm.exp() * lsm.masked_fill(~keep, 0.0)).sum(-1)


def reference(h, w, t, temperature, trunc, g1, g2, chunk):
    """(float64 logp, entropy, dE, dC from materialized logits, token chunk by token chunk;
    the mean kept-set size per token)."""
    wf = w.double().requires_grad_()
    outs, sizes = [], []
    for s in range(0, h.shape[0], chunk):
        hc = h[s:s + chunk].double().requires_grad_()
        logp, ent = eager(hc, wf, t[s:s + chunk], temperature, trunc, torch.float64, sizes)
        loss(logp, ent, g1[s:s + chunk], g2[s:s + chunk]).backward()
        outs.append((logp.detach(), ent.detach(), hc.grad))
    return [torch.cat(x) for x in zip(*outs)] + [wf.grad], float(torch.cat(sizes).double().mean())


def loss(logp, ent, g1, g2):
    return (torch.where(torch.isinf(logp), 0.0, logp) * g1).sum() + (ent * g2).sum()


def rel(x, ref):
    fin = torch.isfinite(ref)
    x, ref = x.double()[fin], ref.double()[fin]
    return float((x - ref).norm() / ref.norm()) if ref.norm() > 0 else float((x - ref).norm())


def providers(t, temperature, backend):
    """name -> (truncation name or "", fn(h, w) -> (logp, entropy))."""
    def cut(trunc):
        return lambda h, w: cutce.linear_log_probs(h, w, t, temperature=temperature,
                                                   return_entropy=True, **trunc)

    table = {"cutce": ("", cut({}))}
    for name, trunc in TRUNCATIONS.items():
        table[f"cutce {name}"] = (name, cut(trunc))
    for name, trunc in TRUNCATIONS.items():
        table[f"torch-eager {name}"] = (
            name, lambda h, w, tr=trunc: eager(h, w, t, temperature, tr))
    for name, trunc in TRUNCATIONS.items():
        fn = torch.compile(lambda h, w, tr=trunc: eager(h, w, t, temperature, tr), backend=backend)
        table[f"torch-compile {name}"] = (name, fn)
    return table


def run(args, device, rows, save=lambda: None):
    n, d, v = (int(x) for x in args.shape.split(","))
    T = args.temperature
    h, w, t = make_inputs(Shape("bench", n, d, v), "zipf", torch.bfloat16, device, seed=0)
    g = torch.Generator(device=device).manual_seed(1)
    g1, g2 = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g)
    refs = {}

    def fwd_bwd(fn):
        a, c = h.detach().requires_grad_(), w.detach().requires_grad_()
        logp, ent = fn(a, c)
        da, dc = torch.autograd.grad(loss(logp, ent, g1, g2), (a, c))
        return logp.detach(), ent.detach(), da, dc

    base = dict(n=n, d=d, v=v, dtype="bf16", temperature=T)
    yard = None
    for name, (trunc, fn) in providers(t, T, args.compile_backend).items():
        every_cutce = name.startswith("cutce") and "cutce" in args.providers
        if name not in args.providers and not every_cutce:
            continue
        row = dict(base, provider=name, truncation=trunc or "none", note="")
        rows.append(row)
        try:
            if trunc not in refs:
                tr = TRUNCATIONS.get(trunc, {})
                refs[trunc] = reference(h, w, t, T, tr, g1, g2, args.ref_chunk)
                measure.free_memory(device)
            if trunc:
                row["kept_mean"] = refs[trunc][1]
            out = fwd_bwd(fn)  # the first call also compiles
            errs = [rel(x, r) for x, r in zip(out, refs[trunc][0])]
            del out
            with torch.no_grad():
                row["fwd_ms"] = measure.median_ms(lambda: fn(h, w), device, args.warmup, args.reps)
            row["fwd_bwd_ms"] = measure.median_ms(lambda: fwd_bwd(fn), device, args.warmup,
                                                  args.reps)
            row["peak_mib"] = measure.peak_extra_mb(lambda: fwd_bwd(fn), device)
            row.update(zip(["logp_err", "entropy_err", "dE_err", "dC_err"], errs))
            if name == "cutce":
                yard = row
            if yard is not None:
                row["fwd_ratio"] = row["fwd_ms"] / yard["fwd_ms"]
                row["fwd_bwd_ratio"] = row["fwd_bwd_ms"] / yard["fwd_bwd_ms"]
            print(f"  {name}: done ({time.perf_counter() - START:.0f} s so far)", flush=True)
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: report and go on
            row["note"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
            print(f"  {name}: {row['note']}", flush=True)
        measure.free_memory(device)
        save()


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def print_report(rows, header):
    print(header)
    print("| provider | kept ids | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | peak MiB | "
          "logp err | entropy err | dE err | dC err | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['provider']} | {fmt(r.get('kept_mean'), '.1f')} | "
              f"{fmt(r.get('fwd_ms'), '.1f')} | "
              f"{ratio(r.get('fwd_ratio'))} | {fmt(r.get('fwd_bwd_ms'), '.1f')} | "
              f"{ratio(r.get('fwd_bwd_ratio'))} | "
              f"{fmt(r.get('peak_mib'), '.0f')} | "
              + " | ".join(fmt(r.get(k), ".1e") for k in ("logp_err", "entropy_err", "dE_err",
                                                          "dC_err"))
              + f" | {r.get('note', '')} |")
    print("\nratios are to the untruncated cutce row (the goal: <= 1.3x at top_k <= 64, <= 1.6x "
          "at top_p / min_p, fwd+bwd)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks the logic")
    ap.add_argument("--shape", default=None, help="N,D,V (default 16384,3584,152064)")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ref-chunk", type=int, default=1024, help="tokens per chunk of the reference")
    ap.add_argument("--providers", nargs="*", default=list(DEFAULT_PROVIDERS),
                    help="provider names ('cutce' runs every cutce row)")
    ap.add_argument("--compile-backend", default=None, help="default inductor (aot_eager on CPU)")
    ap.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    args = ap.parse_args(argv)
    flags = {f"--{k.replace('_', '-')}": " ".join(v) if isinstance(v, list) else v
             for k, v in vars(args).items() if k != "out" and v != ap.get_default(k)}
    if args.cpu_smoke:
        device = torch.device("cpu")
        args.shape = args.shape or "96,32,700"
        args.reps, args.warmup, args.ref_chunk = 1, 0, 32
        args.compile_backend = args.compile_backend or "aot_eager"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on the GPU, or pass --cpu-smoke")
        device = torch.device("cuda")
        args.shape = args.shape or "16384,3584,152064"
        args.compile_backend = args.compile_backend or "inductor"
    meta = dict(results.run_metadata(device), flags=flags)
    env = f"{meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}; {meta['date']}"
    print(f"# {env}", flush=True)
    rows = []
    path = pathlib.Path(args.out) / f"truncated_{device.type}.json"

    def save():  # after every row: a run cut short by a time limit keeps what it measured
        results.write_json(path, "truncated", meta, [{k: r.get(k) for k in FIELDS} for r in rows])

    run(args, device, rows, save)
    print_report(rows, f"\n## truncated log-probs + entropy, head N,D,V={args.shape} bf16, "
                 f"T={args.temperature}; {env}; errors vs float64 from materialized logits\n")
    save()
    print(f"\nwrote {path} ({time.perf_counter() - START:.0f} s in all)")
    return rows


if __name__ == "__main__":
    main()
