"""Per-token log-probs + entropy (RL losses): cutce against TRL's fused LM head, torch eager and
torch.compile, then an end-to-end step of a small HF model.

    PYTHONPATH=src python benchmarks/log_probs.py --out bench-out      # GPU, 2-3 minutes on an H200
    PYTHONPATH=src python benchmarks/log_probs.py --cpu-smoke          # tiny sizes on CPU, seconds

1. Head at a Qwen2.5-7B shape (N=16384, D=3584, V=152064, bf16, temperature 0.9), trained-model-
   like data (cutce.bench.data "zipf"). Providers, each computing per-token log-probs and entropy:
   ``cutce.linear_log_probs`` (default budget, and ``memory_budget="auto"``, which keeps the
   logits from the forward when the free memory holds them); TRL's ``trl.kernels.ChunkedLogProbFunction`` (with the vocabulary
   chunk its ``add_fused_lm_head`` uses); torch eager ``log_softmax((h @ w.T).float() / T)``;
   ``torch.compile`` of it; plus log-probs-only rows of cutce and TRL. For each: forward time,
   forward+backward time of ``(logp * g1 + entropy * g2).sum()`` (random per-token upstream
   gradients, as advantages give), both also as a ratio to one bf16 ``h @ w.T`` of the shape,
   peak memory above the inputs (gradients included), and the relative error (norm of the
   difference / norm) of logp, entropy, dE, dC against a float32 reference from materialized
   logits of the upcast inputs, token chunk by token chunk.
2. End-to-end step of a random-init Qwen2-like model (4 layers, hidden 1024, V=151936, batch
   4 x 1024, bf16): ``cutce.transformers.token_log_probs`` against ``model(...).logits`` +
   float32 log_softmax, all positions and the last 512 (``logits_to_keep``): time and peak memory
   of forward+backward.

Prints a Markdown table and writes ``log_probs_<device>.json`` under --out ({"benchmark":
"log_probs", "meta", "rows"}). A provider that cannot run (TRL not importable, out of memory)
gets a row with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import time
import types

import torch

import cutce
from cutce.bench import measure
from cutce.bench import report as results
from cutce.bench.data import Shape, make_inputs

START = time.perf_counter()
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16 (read when importable)
FIELDS = ["section", "provider", "n", "d", "v", "dtype", "temperature", "matmul_ms", "fwd_ms",
          "fwd_ratio", "fwd_bwd_ms", "fwd_bwd_ratio", "peak_mib", "logp_err", "entropy_err", "dE_err",
          "dC_err", "note"]


class Bench:
    def __init__(self, device, reps, warmup):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn):
        """Median over reps, after warm-up (cutce.bench's timer: CUDA events / perf_counter)."""
        return measure.median_ms(fn, self.device, self.warmup, self.reps)

    def peak_mib(self, fn):
        """Allocator peak above what is allocated before the call (nan on CPU)."""
        if not self.cuda:
            fn()
            return float("nan")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20


def rel(x, ref):
    return float((x.float() - ref.float()).norm() / ref.float().norm())


def load_trl():
    """(ChunkedLogProbFunction or None, vocabulary chunk, why TRL's rows are missing or "")."""
    try:
        from trl.kernels import ChunkedLogProbFunction
    except Exception as e:  # noqa: BLE001 -- any import failure is reported, not fatal
        return None, TRL_CHUNK, f"trl not importable: {type(e).__name__}: {e}"[:200]
    try:
        from trl.trainer import utils as trl_utils

        chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", TRL_CHUNK)
    except Exception:  # noqa: BLE001
        # Its backward imports maybe_gather_lm_head_ctx from trl.trainer.utils, whose imports
        # (pandas, datasets, ...) may be missing here. Without DeepSpeed ZeRO-3 that function
        # returns a nullcontext, so a stand-in with exactly that behaviour changes none of TRL's
        # numbers: the rows carry no note about it.
        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = stub
        chunk = TRL_CHUNK
    return ChunkedLogProbFunction, chunk, ""


def eager(h, w, t, temperature):
    lsm = torch.log_softmax((h @ w.T).float() / temperature, dim=-1)
    return lsm.gather(-1, t[:, None])[:, 0], -(lsm.exp() * lsm).sum(-1)


def reference(h, w, t, temperature, g1, g2, chunk):
    """float32 logp, entropy, dE, dC from materialized logits of the upcast inputs, by token chunk."""
    wf = w.float().requires_grad_()
    logps, ents, dhs = [], [], []
    for s in range(0, h.shape[0], chunk):
        hc = h[s:s + chunk].float().requires_grad_()
        logp, ent = eager(hc, wf, t[s:s + chunk], temperature)
        ((logp * g1[s:s + chunk]).sum() + (ent * g2[s:s + chunk]).sum()).backward()
        logps.append(logp.detach())
        ents.append(ent.detach())
        dhs.append(hc.grad)
    return torch.cat(logps), torch.cat(ents), torch.cat(dhs), wf.grad


def head_providers(t, temperature, trl_fn, trl_chunk, compile_backend):
    def cutce_fn(h, w, entropy=True, budget=None):
        return cutce.linear_log_probs(h, w, t, temperature=temperature, return_entropy=entropy,
                                      memory_budget=budget)

    def trl(h, w, entropy=True):
        out = trl_fn.apply(h, w, None, t, temperature, trl_chunk, None, 1.0,
                           ("entropy",) if entropy else ())
        return out[:2] if entropy else out[0]

    compiled = torch.compile(lambda h, w: eager(h, w, t, temperature), backend=compile_backend)
    return {
        "cutce": cutce_fn,
        "cutce, memory_budget=auto": lambda h, w: cutce_fn(h, w, budget="auto"),
        "trl": trl,
        "torch-eager": lambda h, w: eager(h, w, t, temperature),
        f"torch-compile ({compile_backend})": compiled,
        "cutce, logp only": lambda h, w: cutce_fn(h, w, False),
        "cutce, logp only, auto": lambda h, w: cutce_fn(h, w, False, "auto"),
        "trl, logp only": lambda h, w: trl(h, w, False),
    }


def run_head(bench, args, shape, trl_fn, trl_chunk, trl_note, rows):
    n, d, v = shape
    T = args.temperature
    h, w, t = make_inputs(Shape("bench", n, d, v), "zipf", torch.bfloat16, bench.device, seed=0)
    g = torch.Generator(device=bench.device).manual_seed(1)
    g1 = torch.randn(n, device=bench.device, generator=g)
    g2 = torch.randn(n, device=bench.device, generator=g)
    ref = reference(h, w, t, T, g1, g2, args.ref_chunk)
    mm = measure.matmul_ms(h, w, torch.bfloat16, warmup=bench.warmup, repeats=bench.reps)
    bench.sync()
    if bench.cuda:
        torch.cuda.empty_cache()

    def fwd_bwd(fn):
        a, c = h.detach().requires_grad_(), w.detach().requires_grad_()
        out = fn(a, c)
        logp, ent = out if isinstance(out, tuple) else (out, None)
        loss = (logp * g1).sum() + (0 if ent is None else (ent * g2).sum())
        da, dc = torch.autograd.grad(loss, (a, c))
        return logp.detach(), None if ent is None else ent.detach(), da, dc

    base = dict(section="head", n=n, d=d, v=v, dtype="bf16", temperature=T, matmul_ms=mm)
    ref_lp = None
    for name, fn in head_providers(t, T, trl_fn, trl_chunk, args.compile_backend).items():
        if args.providers and not any(p in name for p in args.providers):
            continue
        row = dict(base, provider=name, note="")
        if name.startswith("trl") and trl_fn is None:
            row["note"] = trl_note
            rows.append(row)
            print(f"  {name}: skipped ({trl_note})", flush=True)
            continue
        try:
            t0 = time.perf_counter()
            out = fwd_bwd(fn)  # also the first call (compilation)
            bench.sync()
            first = time.perf_counter() - t0
            if "logp only" in name:
                # Its dE/dC are of logp * g1 alone: compare with that part of the reference.
                if ref_lp is None:
                    ref_lp = reference(h, w, t, T, g1, torch.zeros_like(g2), args.ref_chunk)
                errs = [rel(out[0], ref_lp[0]), float("nan"), rel(out[2], ref_lp[2]), rel(out[3], ref_lp[3])]
            else:
                errs = [rel(x, r) for x, r in zip(out, ref)]
            del out
            with torch.no_grad():
                row["fwd_ms"] = bench.time_ms(lambda: fn(h, w))
            row["fwd_bwd_ms"] = bench.time_ms(lambda: fwd_bwd(fn))
            row["fwd_ratio"], row["fwd_bwd_ratio"] = row["fwd_ms"] / mm, row["fwd_bwd_ms"] / mm
            row["peak_mib"] = bench.peak_mib(lambda: fwd_bwd(fn))
            row.update(zip(["logp_err", "entropy_err", "dE_err", "dC_err"], errs))
            print(f"  {name}: done (first call {first:.1f} s; {time.perf_counter() - START:.0f} s so far)",
                  flush=True)
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: report and go on
            row["note"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
            print(f"  {name}: {row['note']}", flush=True)
        rows.append(row)
        if bench.cuda:
            torch.cuda.empty_cache()
    del ref, ref_lp


def qwen2_like(args, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if args.cpu_smoke:
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1000)
    else:
        cfg = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                   num_key_value_heads=2, vocab_size=151936)
    torch.manual_seed(0)
    config = Qwen2Config(max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False, **cfg)
    with torch.device(device):  # initialized where it runs: seconds, not a minute on the host
        return Qwen2ForCausalLM(config).to(dtype=torch.bfloat16).train()


def run_e2e(bench, args, rows):
    from cutce.transformers import token_log_probs

    model = qwen2_like(args, bench.device)
    b, seq = (2, 32) if args.cpu_smoke else (4, 1024)
    T, v = args.temperature, model.config.vocab_size
    g = torch.Generator(device=bench.device).manual_seed(2)
    ids = torch.randint(0, v, (b, seq), device=bench.device, generator=g)
    mask = torch.ones_like(ids)
    mask[0, :seq // 4] = 0  # left padding in one row
    adv = torch.randn(b, 1, device=bench.device, generator=g)

    def logits_path(keep):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        if keep:
            logits = logits[:, -keep:]
        lsm = (logits / T).float().log_softmax(-1)
        tgt = ids[:, 1:][:, -keep:] if keep else ids[:, 1:]
        return lsm.gather(-1, tgt[..., None])[..., 0], -(lsm.exp() * lsm).sum(-1)

    def step(fn):
        model.zero_grad(set_to_none=True)
        logp, ent = fn()
        (-(logp * adv).mean() - 1e-3 * ent.mean()).backward()
        return logp.detach()

    params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    for keep in (None, seq // 2):
        providers = {
            "cutce token_log_probs": lambda: token_log_probs(model, ids, mask, logits_to_keep=keep,
                                                             temperature=T, return_entropy=True),
            "model(...).logits + log_softmax": lambda: logits_path(keep),
        }
        outs = {}
        for name, fn in providers.items():
            row = dict(section="e2e", provider=name, n=b * (keep or seq - 1), d=model.config.hidden_size,
                       v=v, dtype="bf16", temperature=T,
                       note=f"Qwen2-like {model.config.num_hidden_layers} layers, batch {b}x{seq}, "
                            f"logits_to_keep={keep}, params {params_mib:.0f} MiB")
            try:
                outs[name] = step(fn)
                with torch.no_grad():
                    row["fwd_ms"] = bench.time_ms(fn)
                row["fwd_bwd_ms"] = bench.time_ms(lambda: step(fn))
                model.zero_grad(set_to_none=True)
                row["peak_mib"] = bench.peak_mib(lambda: step(fn))  # parameter gradients included
            except Exception as e:  # noqa: BLE001
                row["note"] += f"; failed: {type(e).__name__}: {str(e)[:160]}"
            rows.append(row)
            print(f"  e2e {name}, logits_to_keep={keep}: done", flush=True)
            if bench.cuda:
                torch.cuda.empty_cache()
        if len(outs) == 2:
            a, c = outs.values()
            rows[-2]["logp_err"] = rel(a, c)
            rows[-2]["note"] += "; logp err: vs the logits path (bf16 logits), not a reference"
    model.zero_grad(set_to_none=True)


def fmt(x, spec):
    return "" if x is None or x == "" else format(x, spec)


def ratio(x):
    return "" if x is None else f"{x:.2f}x"


def print_report(rows, header):
    print(header)
    print("| section | provider | N | fwd ms | fwd ratio | fwd+bwd ms | ratio | peak MiB | logp err | "
          "entropy err | dE err | dC err | note |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['section']} | {r['provider']} | {r['n']} | {fmt(r.get('fwd_ms'), '.1f')} | "
              f"{ratio(r.get('fwd_ratio'))} | {fmt(r.get('fwd_bwd_ms'), '.1f')} | "
              f"{ratio(r.get('fwd_bwd_ratio'))} | {fmt(r.get('peak_mib'), '.0f')} | "
              + " | ".join(fmt(r.get(k), ".1e") for k in ("logp_err", "entropy_err", "dE_err", "dC_err"))
              + f" | {r.get('note', '')} |")
    by = {r["provider"]: r for r in rows if r["section"] == "head"}
    c, trl, eg = by.get("cutce"), by.get("trl"), by.get("torch-eager")
    if c and trl and c.get("fwd_bwd_ms") and trl.get("fwd_bwd_ms"):
        print(f"\ncutce vs TRL (logp + entropy, fwd+bwd): {trl['fwd_bwd_ms'] / c['fwd_bwd_ms']:.2f}x faster, "
              f"peak {c['peak_mib']:.0f} vs {trl['peak_mib']:.0f} MiB")
    c1, trl1 = by.get("cutce, logp only"), by.get("trl, logp only")
    if c1 and trl1 and c1.get("fwd_bwd_ms") and trl1.get("fwd_bwd_ms"):
        print(f"cutce vs TRL (logp only, fwd+bwd): {trl1['fwd_bwd_ms'] / c1['fwd_bwd_ms']:.2f}x faster, "
              f"peak {c1['peak_mib']:.0f} vs {trl1['peak_mib']:.0f} MiB")
    if c and eg and c.get("logp_err") is not None and eg.get("logp_err") is not None:
        ratios = {k: c[k] / eg[k] for k in ("logp_err", "entropy_err", "dE_err", "dC_err") if eg.get(k)}
        print("cutce error / eager bf16 error: " + ", ".join(f"{k} {x:.2f}" for k, x in ratios.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks the logic only")
    ap.add_argument("--shape", default=None, help="N,D,V of the head (default 16384,3584,152064)")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ref-chunk", type=int, default=2048, help="tokens per chunk of the float32 reference")
    ap.add_argument("--providers", nargs="*", default=None, help="substrings of head provider names")
    ap.add_argument("--compile-backend", default=None, help="default inductor (aot_eager with --cpu-smoke)")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    args = ap.parse_args(argv)
    # the flags this run was given, for the page's "Reproduce" line
    flags = {f"--{k.replace('_', '-')}": " ".join(v) if isinstance(v, list) else v
             for k, v in vars(args).items() if k != "out" and v != ap.get_default(k)}
    if args.cpu_smoke:
        device = torch.device("cpu")
        args.shape = args.shape or "512,64,3000"
        args.reps, args.warmup, args.ref_chunk = min(args.reps, 2), min(args.warmup, 1), 256
        args.compile_backend = args.compile_backend or "aot_eager"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on the GPU, or pass --cpu-smoke")
        device = torch.device("cuda")
        args.shape = args.shape or "16384,3584,152064"
        args.compile_backend = args.compile_backend or "inductor"
    shape = tuple(int(x) for x in args.shape.split(","))
    bench = Bench(device, args.reps, args.warmup)
    trl_fn, trl_chunk, trl_note = load_trl()
    meta = dict(results.run_metadata(device), flags=flags)
    env = (f"{meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, "
           f"peers {results.format_peers(meta['peers'])}; {meta['date']}")
    print(f"# {env}", flush=True)
    rows = []
    run_head(bench, args, shape, trl_fn, trl_chunk, trl_note, rows)
    if not args.no_e2e:
        run_e2e(bench, args, rows)
    n, d, v = shape
    print_report(rows, f"\n## log-probs + entropy, head N={n} D={d} V={v} bf16, T={args.temperature}; "
                 f"{env}; errors vs float32 from materialized logits\n")
    path = pathlib.Path(args.out) / f"log_probs_{device.type}.json"
    results.write_json(path, "log_probs", meta, [{k: r.get(k) for k in FIELDS} for r in rows])
    print(f"\nwrote {path} ({time.perf_counter() - START:.0f} s in all)")
    return rows


if __name__ == "__main__":
    main()
