"""`cutce bench`: its options, and the run (inputs -> reference -> matmul -> each provider ->
table, JSON, PNG)."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from . import data, measure, providers, report

DEFAULT_OUT = "bench-out"
MODES = ("both", "fwd", "fwd-bwd")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``cutce bench`` (defaults that depend on the device are resolved in
    :func:`run`, so that ``--help`` reads the same everywhere)."""
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda when available, else cpu")
    p.add_argument("--shape", help="gemma2-2b (8192,2304,256000), llama3-8b (8192,4096,128256), "
                   "cpu-medium (4096,512,32768), cpu-small (2048,512,16384) or N,D,V; "
                   "default: gemma2-2b on cuda, cpu-medium on cpu")
    p.add_argument("--sweep-n", metavar="N1,N2,...",
                   help="run every N in the list at the shape's D and V (time and memory vs N plots)")
    p.add_argument("--data", choices=data.DATA_KINDS, default="zipf",
                   help="zipf: trained-model-like (default); flat: uniform targets, unit-variance logits")
    p.add_argument("--dtype", choices=sorted(data.DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--providers", nargs="+", metavar="NAME",
                   help=f"any of {', '.join(providers.PROVIDERS)} or all (spaces or commas); "
                   "default: every one that can run here (torch-compile only on cuda; torch-native* "
                   "need torch >= 2.13)")
    p.add_argument("--mode", choices=MODES, default="both",
                   help="measure the forward only, forward+backward only, or both (default)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement, median reported "
                   "(default: 10 on cuda, 2 on cpu)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default: 3 on cuda, 1 on cpu)")
    p.add_argument("--matmul-dtype", choices=sorted(data.DTYPES),
                   help="dtype of the hidden @ weight.T that times are divided by "
                   "(default: bf16 on cuda, the run's dtype on cpu)")
    p.add_argument("--in-process", action="store_true",
                   help="on cpu, measure every provider in this process instead of one process "
                   "each (no memory numbers then)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data (default 0)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    p.add_argument("--plot-only", metavar="FILE.json",
                   help="only (re)make the PNG of a result file that cutce bench wrote")
    p.add_argument("--list-providers", action="store_true",
                   help="list the providers and whether each can run here, then exit")


def _resolve(args):
    """Fill the device-dependent defaults; raises ValueError on a bad combination."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: expected a CUDA device, got none (torch.cuda.is_available() is False)")
    cuda = device.type == "cuda"
    shape = data.parse_shape(args.shape or ("gemma2-2b" if cuda else "cpu-medium"))
    dtype = data.parse_dtype(args.dtype or ("bf16" if cuda else "fp32"))
    mm_name = args.matmul_dtype or ("bf16" if cuda else (args.dtype or "fp32"))
    shapes = [shape]
    if args.sweep_n:
        try:
            ns = [int(x) for x in args.sweep_n.split(",") if x]
        except ValueError:
            raise ValueError(f"--sweep-n: expected integers separated by commas, got {args.sweep_n!r}") from None
        if not ns or min(ns) < 1:
            raise ValueError(f"--sweep-n: expected positive integers, got {args.sweep_n!r}")
        shapes = [shape.with_n(n) for n in ns]
    names = None if args.providers is None else providers.parse_provider_names(args.providers)
    repeats = args.repeats if args.repeats is not None else (10 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"--repeats/--warmup: expected >= 1 and >= 0, got {repeats} and {warmup}")
    return device, shapes, dtype, mm_name, names, repeats, warmup


def _stem(device, shape, kind, dtype_name, sweep):
    # A sweep over N of a custom shape is named by D and V only.
    slug = f"Nx{shape.d}x{shape.v}" if sweep and shape.custom else shape.name.replace(",", "x")
    return f"bench_{device.type}_{slug}_{kind}_{dtype_name}" + ("_sweep" if sweep else "")


def _list_providers(device) -> int:
    chosen, skipped = providers.select(None, device)
    for p in chosen:
        print(f"  {p.name:24s} runs by default{'' if p.exact else ' (filtered gradients)'}")
    for name, why in skipped:
        print(f"  {name:24s} skipped: {why}")
    return 0


def _mem_method(device, args) -> str:
    """How memory is measured: the CUDA allocator, RSS of one process per provider (CPU, Linux),
    or not at all."""
    if device.type == "cuda":
        return "cuda-allocator"
    if not args.in_process and measure.RssPeak.available():
        return "rss-subprocess"
    return "none"


def _result_row(base, res: measure.Result, provider, matmul_ms):
    row = dict(base, provider=provider.name, exact=provider.exact, status=res.status,
               error="; ".join(res.errors))
    for k in ("fwd_ms", "fwd_mb", "fwdbwd_ms", "peak_mb", "loss_err", "de_err", "dc_err"):
        row[k] = getattr(res, k)
    row["fwd_ratio"] = None if res.fwd_ms is None else res.fwd_ms / matmul_ms
    row["fwdbwd_ratio"] = None if res.fwdbwd_ms is None else res.fwdbwd_ms / matmul_ms
    return row


def _bench_provider(p, title, base, mm, args, device, hidden, weight, targets, ref, repeats, warmup,
                    inputs_path):
    """One provider's row: measured in a process of its own when ``inputs_path`` (CPU memory),
    else in this one."""
    print(f"{title} ...", flush=True)
    t1 = time.perf_counter()
    if inputs_path is not None:
        res = measure.measure_in_subprocess(p.name, inputs_path, warmup=warmup, repeats=repeats,
                                            mode=args.mode)
    else:
        try:
            fn = p.build(device)
        except Exception as exc:  # a peer that imports but cannot set up: a row, not a crash
            res = measure.Result(errors=[f"setup: {type(exc).__name__}: {exc}"[:300]])
        else:
            res = measure.measure(fn, hidden, weight, targets, ref, warmup=warmup,
                                  repeats=repeats, mode=args.mode)
            del fn
    measure.free_memory(device)
    row = _result_row(base, res, p, mm)
    done = ", ".join(f"{label} {report.fmt_ms(row[k])} ms"
                     for k, label in (("fwd_ms", "fwd"), ("fwdbwd_ms", "fwd+bwd")) if row[k] is not None)
    print(f"      {done or 'no timing'}{'  ERROR ' + row['error'] if row['error'] else ''}"
          f"  ({time.perf_counter() - t1:.1f} s)", flush=True)
    return row


def _bench_shape(shape, args, device, dtype, dtype_name, mm_name, chosen, skipped,
                 repeats, warmup, step, total):
    """All providers at one shape: returns the result rows (skipped providers included)."""
    t0 = time.perf_counter()
    hidden, weight, targets = data.make_inputs(shape, args.data, dtype, device, args.seed)
    max_prob, entropy = data.data_stats(hidden, weight)
    ref = measure.reference(hidden, weight, targets)
    mm = measure.matmul_ms(hidden, weight, data.DTYPES[mm_name], warmup=warmup, repeats=repeats)
    print(f"== {shape} {args.data} {dtype_name}: mean max-prob {max_prob:.2f}, entropy "
          f"{entropy:.2f} nats; reference {ref.label}; {mm_name} matmul {mm:.3g} ms "
          f"(set-up {time.perf_counter() - t0:.1f} s)", flush=True)
    base = dict(shape=shape.name, n=shape.n, d=shape.d, v=shape.v, data=args.data,
                dtype=dtype_name, max_prob=max_prob, entropy=entropy, reference=ref.label,
                warmup=warmup, repeats=repeats, matmul_dtype=mm_name, matmul_ms=mm)
    mem_method = _mem_method(device, args)
    base["mem_method"] = mem_method
    rows = []
    tmp = None
    if mem_method == "rss-subprocess":
        tmp = tempfile.TemporaryDirectory(prefix="cutce-bench-")
        inputs_path = os.path.join(tmp.name, "inputs.pt")
        measure.save_inputs(inputs_path, hidden, weight, targets, ref)
    try:
        for p in chosen:
            step += 1
            rows.append(_bench_provider(p, f"[{step}/{total}] {p.name} N={shape.n}", base, mm, args, device,
                                        hidden, weight, targets, ref, repeats, warmup,
                                        None if tmp is None else inputs_path))
    finally:
        if tmp is not None:
            tmp.cleanup()
    rows += [dict(base, provider=name, exact=providers.PROVIDERS[name].exact, status="skipped",
                  error=why, mem_method=None) for name, why in skipped]
    del hidden, weight, targets, ref
    measure.free_memory(device)
    return rows, step


def run(args) -> int:
    """Run ``cutce bench`` with parsed ``args``; returns the exit code."""
    if args.plot_only:
        from .plots import plot_json

        print(f"wrote {plot_json(args.plot_only)}")
        return 0
    try:
        device, shapes, dtype, mm_name, names, repeats, warmup = _resolve(args)
    except ValueError as exc:
        print(f"cutce bench: {exc}")
        return 2
    if args.list_providers:
        return _list_providers(device)
    dtype_name = {v: k for k, v in data.DTYPES.items()}[dtype]
    chosen, skipped = providers.select(names, device)
    for name, why in skipped:
        print(f"skip {name}: {why}")
    if not chosen:
        print("cutce bench: no provider can run here (see the skip lines above)")
        return 2
    meta = report.run_metadata(device)
    print(f"cutce bench on {meta['device_name']} | torch {meta['torch']}, triton {meta['triton']}, "
          f"cutce {meta['cutce']} ({meta['commit']}), peers: {report.format_peers(meta['peers'])} | {len(chosen)} providers x "
          f"{len(shapes)} shape(s), warm-up {warmup}, median of {repeats}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, _stem(device, shapes[0], args.data, dtype_name, len(shapes) > 1) + ".json")
    rows, step, total = [], 0, len(chosen) * len(shapes)
    for shape in shapes:
        new, step = _bench_shape(shape, args, device, dtype, dtype_name, mm_name, chosen, skipped,
                                 repeats, warmup, step, total)
        rows += new
        # Written after every shape: a long sweep that is stopped keeps what it measured.
        report.write_json(json_path, "loss", meta, [{k: r.get(k) for k in report.ROW_FIELDS} for r in rows])
        print()
        print(f"{shape}, {args.data} data, {dtype_name}; ratios to one {mm_name} matmul "
              f"({report.fmt_ms(new[0]['matmul_ms'])} ms); MB = {report.MEM_METHODS[new[0]['mem_method']]}, dE + dC alone take "
              f"{report.gradients_mb(shape.n, shape.d, shape.v, dtype_name):.0f} MiB; "
              f"errors vs {new[0]['reference']}:")
        print("\n".join(report.table_lines(new)))
        print()
    print(f"wrote {json_path}")
    if not args.no_plot:
        try:
            from .plots import plot_json

            print(f"wrote {plot_json(json_path)}")
        except ImportError as exc:
            print(f"no plot: {exc} (pip install matplotlib; then cutce bench --plot-only {json_path})")
    return 0
