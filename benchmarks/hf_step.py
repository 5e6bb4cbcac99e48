"""End-to-end HF training step (forward + backward): original vs cutce-patched model, eager vs
``torch.compile(model)``.

    PYTHONPATH=src python benchmarks/hf_step.py --out bench-out   # CUDA: Llama-like, V=128256, bf16
    PYTHONPATH=src python benchmarks/hf_step.py --cpu-smoke       # tiny CPU run (aot_eager backend)

A random-init Llama (from a config, nothing downloaded) and one fixed batch; four variants of the
same model and weights, each after ``torch._dynamo.reset()``:

* original, eager: transformers' own forward (N x V logits, upcast to float32 in its loss);
* original, compiled: ``torch.compile(model)`` of it;
* cutce, eager: ``cutce.transformers.patch(model)``;
* cutce, compiled: ``torch.compile`` of the patched model.

Prints a Markdown table: time of the first step (compilation included), ms per step (mean of
--steps after --warmup), peak memory over the timed steps (parameters and their gradients
included; gradients are freed before every step), the loss, and the loss and gradient
differences to the original eager model. Writes hf_step_<device>.json under --out
({"benchmark": "hf_step", "meta", "rows"}).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from cutce.bench import report

GPU = dict(hidden=1024, layers=4, heads=16, kv_heads=4, inter=4096, vocab=128256, batch=4, seq=1024,
           dtype="bfloat16", backend="inductor")
CPU = dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=2048, batch=2, seq=64,
           dtype="float32", backend="aot_eager")  # inductor on a small CPU: minutes per graph


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="--device cpu with tiny sizes and 2 steps: checks the logic in seconds")
    for key, value in GPU.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                        help=f"default {value} on cuda, {CPU[key]} on cpu")
    ap.add_argument("--impl", default="auto", help="cutce impl (auto: Triton on CUDA, torch on CPU)")
    ap.add_argument("--memory-budget", type=float, default=None, help="cutce memory_budget")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.warmup, args.steps = "cpu", 1, 2
    for key, value in (GPU if args.device == "cuda" else CPU).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, args.dtype)).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : args.seq // 8] = -100  # a masked prompt, as in SFT
    return model, ids, labels


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, model, ids, labels, args, device):
    """First-step seconds, ms/step, peak MiB (None on CPU), loss (float), gradients (float32
    copies on the host)."""
    def step():
        model.zero_grad(set_to_none=True)
        loss = fn(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss

    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        step()
    model.zero_grad(set_to_none=True)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    # On the host: copies kept on the device would count in the next variants' peaks.
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters()}
    return first, ms, peak, loss.item(), grads


def main(argv=None):
    args = parse(argv)
    import transformers

    import cutce.transformers as ct

    device = torch.device(args.device)
    model, ids, labels = build(args, device)
    rows, ref = [], None
    for name, patched, compiled in (("original", False, False), ("original", False, True),
                                    ("cutce", True, False), ("cutce", True, True)):
        torch._dynamo.reset()
        if patched and not ct.is_patched(model):
            ct.patch(model, impl=args.impl, memory_budget=args.memory_budget)
        fn = torch.compile(model, backend=args.backend) if compiled else model
        first, ms, peak, loss, grads = measure(fn, model, ids, labels, args, device)
        if ref is None:
            ref = (loss, grads)
        grad_err = max(((g - ref[1][n]).abs().max() / ref[1][n].abs().max().clamp_min(1e-30)).item()
                       for n, g in grads.items())
        rows.append(dict(variant=name, compiled=compiled, first_s=first, ms=ms, peak_mib=peak,
                         loss=loss, dloss=abs(loss - ref[0]), grad_rel_err=grad_err))
        del grads
    ct.unpatch(model)

    meta = report.run_metadata(device)
    setting = {k: getattr(args, k) for k in (*GPU, "impl", "memory_budget", "warmup", "steps")}
    print(f"{meta['device_name']}; torch {meta['torch']}, transformers {transformers.__version__}; "
          f"Llama hidden {args.hidden}, {args.layers} layers, V={args.vocab}, {args.dtype}, "
          f"batch {args.batch} x {args.seq}; backend {args.backend}; mean of {args.steps} steps\n")
    print("| model | compiled | first step (s) | ms/step | peak MiB | loss | Δ loss vs original eager "
          "| max grad err (rel.) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"| {r['variant']} | {'yes' if r['compiled'] else 'no'} | {r['first_s']:.1f} | "
              f"{r['ms']:.1f} | {peak} | {r['loss']:.5f} | {r['dloss']:.2e} | {r['grad_rel_err']:.2e} |")
    path = os.path.join(args.out, f"hf_step_{device.type}.json")
    print(f"wrote {report.write_json(path, 'hf_step', meta, [dict(setting, **r) for r in rows])}")
    return rows


if __name__ == "__main__":
    main()
