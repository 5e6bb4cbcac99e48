"""Train a small causal LM from scratch with and without cutce and compare the loss curves.

    python examples/demo.py [--steps 20 --no-noise-run]     # or `cutce demo ...` in a checkout

Text that every machine has offline: the Python standard library's own source files (sorted, so
that a given Python version always reads the same text). A byte-level BPE vocabulary is trained on
it on the fly with the ``tokenizers`` library, so the vocabulary is as large as a real LM's. Three
runs of a tiny Llama, each in its own spawned process so that its peak memory is its own:

1. ``original``, seed s: transformers' loss (the N x V logits are materialized);
2. ``cutce``, seed s: the same model patched with :func:`cutce.transformers.patch`;
3. ``original``, seed s+1: the run-to-run noise baseline.

Every run sees the same batches (the data order has its own seed), so run 3 differs from run 1
only by its initialisation. Agreement: the mean |loss difference| over the last K steps, cutce vs
original, next to the same measure for the two original runs. Peak memory: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the peak resident set size of the run's process.
Writes a PNG (loss curves, per-step |difference|, peak memory) and a JSON with all numbers, by
default under ``demo-out/``; each run shows its progress (a tqdm bar on a terminal, else a line
every 10 % of the steps). ``--plot-only FILE.json`` remakes the PNG from a JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import sysconfig
import time

import torch

DEFAULTS = {  # per device: CPU finishes in a few minutes on two cores; CUDA is an H200-sized run
    "cpu": dict(vocab=32768, steps=200, seq_len=128, batch=4, hidden=64, layers=2, heads=4,
                corpus_mb=8.0, lr=3e-3),  # 2.5-5 min on 2 cores: BPE 5-15 s, 3 runs of 40-90 s
    "cuda": dict(vocab=131072, steps=300, seq_len=2048, batch=8, hidden=512, layers=4, heads=8,
                 corpus_mb=0.0, lr=1e-3),
}


OUT_DIR = "demo-out"


def _parser():
    p = argparse.ArgumentParser(
        prog="demo.py",
        description="Train a small Llama from scratch on the Python standard library's source, "
        "with transformers' loss and with cutce's, and plot loss curves and peak memory. "
        "Defaults depend on --device (CPU: " + ", ".join(f"{k}={v}" for k, v in DEFAULTS["cpu"].items())
        + "; CUDA: " + ", ".join(f"{k}={v}" for k, v in DEFAULTS["cuda"].items()) + "). "
        "Expected time with the CPU defaults: 2.5 to 5 minutes on 2 cores, depending on their load "
        "(tokenizer 5-15 s, then three training runs of 40-90 s each, with progress shown); "
        "--steps 20 --no-noise-run takes under a minute. On an H200 the CUDA defaults take a few "
        "minutes. Output: " + OUT_DIR + "/demo-<device>.png and .json.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--vocab", type=int, help="vocabulary size V (the BPE may learn fewer tokens "
                   "when the text is too small; the model keeps V classes)")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--batch", type=int, help="sequences per step")
    p.add_argument("--hidden", type=int, help="hidden size of the model")
    p.add_argument("--layers", type=int, help="decoder layers")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW, warmup then cosine)")
    p.add_argument("--corpus-mb", type=float, help="MB of source text to read (0: all of it)")
    p.add_argument("--seed", type=int, default=0, help="model seed s of the compared runs")
    p.add_argument("--data-seed", type=int, default=1234, help="seed of the batch order (shared)")
    p.add_argument("--last", type=int, default=100, help="K: steps at the end that the agreement "
                   "measure averages over (at most half the steps)")
    p.add_argument("--impl", default="auto", help="cutce impl: auto, torch or triton")
    p.add_argument("--no-noise-run", action="store_true", help="skip run 3 (no noise baseline)")
    p.add_argument("--out", default=None, help=f"PNG path (default {OUT_DIR}/demo-<device>.png); "
                   "the numbers go to the same path with .json")
    p.add_argument("--plot-only", metavar="FILE.json", default=None, help="remake the PNG from a "
                   "JSON this demo wrote (to --out, default: next to the JSON), without training")
    return p


def main(argv=None) -> int:
    """Run the demo; returns 0. ``argv`` excludes the program name."""
    args = _parser().parse_args(argv)
    if args.plot_only:
        src = pathlib.Path(args.plot_only)
        out = pathlib.Path(args.out) if args.out else src.with_suffix(".png")
        plot(json.loads(src.read_text()), out)
        print(f"wrote {out}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for key, value in DEFAULTS["cuda" if device.startswith("cuda") else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = pathlib.Path(args.out or f"{OUT_DIR}/demo-{device.split(':')[0]}.png")
    last = max(1, min(args.last, args.steps // 2))

    t0 = time.perf_counter()
    print(f"reading the standard library's source and training a {args.vocab}-token BPE on it ...",
          flush=True)
    texts = read_corpus(args.corpus_mb)
    ids, learned = tokenize(texts, args.vocab)
    prep_s = time.perf_counter() - t0
    print(f"corpus: {sum(map(len, texts)) / 1e6:.1f} M characters from the standard library, "
          f"{ids.numel() / 1e6:.2f} M tokens; BPE learned {learned} tokens (model V={args.vocab}); "
          f"{prep_s:.0f} s", flush=True)

    spec = dict(vars(args), device=device, out=None)
    runs = [("original", args.seed, False), ("cutce", args.seed, True)]
    if not args.no_noise_run:
        runs.append(("original", args.seed + 1, False))
    results = []
    for i, (label, seed, patched) in enumerate(runs, 1):
        print(f"run {i}/{len(runs)}: {label}, seed {seed}, {args.steps} steps", flush=True)
        r = _in_fresh_process(dict(spec, seed=seed, patched=patched), ids)
        r.update(label=label, seed=seed)
        print(f"{label:>8} seed {seed}: final loss {r['losses'][-1]:.4f}, {r['ms_per_step']:.0f} "
              f"ms/step, peak {r['memory_kind']} {r['peak_mb']:.0f} MB ({r['base_mb']:.0f} MB "
              "before the first step)", flush=True)
        results.append(r)

    summary = {
        "device": _device_name(device), "torch": torch.__version__,
        "transformers": _transformers_version(), "tokens": ids.numel(), "bpe_tokens": learned,
        "config": {k: getattr(args, k) for k in
                   ("vocab", "steps", "seq_len", "batch", "hidden", "layers", "heads", "lr", "impl")},
        "last_k": last, "runs": results,
        "mean_abs_diff_cutce_vs_original": mean_abs_diff(results[0]["losses"], results[1]["losses"], last),
        "mean_abs_diff_seed_vs_seed": (mean_abs_diff(results[0]["losses"], results[2]["losses"], last)
                                       if len(results) > 2 else None),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(summary, out)
    noise = summary["mean_abs_diff_seed_vs_seed"]
    print(f"mean |loss difference| over the last {last} steps: cutce vs original "
          f"{summary['mean_abs_diff_cutce_vs_original']:.3g}"
          + ("" if noise is None else f"; original seed {args.seed} vs seed {args.seed + 1}: {noise:.3g}"))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def read_corpus(max_mb):
    """The standard library's .py files in sorted order, up to ``max_mb`` MB (0: all)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    texts, size = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if max_mb and size >= max_mb * 1e6:
            break
    return texts


def tokenize(texts, vocab):
    """Train a byte-level BPE of at most ``vocab`` tokens on ``texts``; return (ids, learned)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    ids = [i for enc in tok.encode_batch(texts) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.int32), tok.get_vocab_size()


def mean_abs_diff(a, b, k):
    """Mean |a_i - b_i| over the last ``k`` steps: the agreement measure."""
    return sum(abs(x - y) for x, y in zip(a[-k:], b[-k:])) / k


def _in_fresh_process(spec, ids):
    """Run :func:`train` in a spawned process: its peak memory then belongs to that run alone."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(spec, ids, queue))
    proc.start()
    result = queue.get()  # before join: a large result would otherwise block the child's exit
    proc.join()
    if isinstance(result, BaseException):
        raise RuntimeError(f"demo run {spec} failed") from result
    return result


def _child(spec, ids, queue):
    try:
        queue.put(train(spec, ids))
    except BaseException as e:  # noqa: BLE001 -- handed to the parent, which raises it
        queue.put(RuntimeError(f"{type(e).__name__}: {e}"))


def train(spec, ids):
    """One run; returns the per-step losses, ms/step and peak memory (MB)."""
    import transformers

    from cutce import transformers as cutce_transformers

    device = torch.device(spec["device"])
    config = transformers.LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["hidden"] * 8 // 3,
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"], max_position_embeddings=spec["seq_len"],
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(spec["seed"])
    model = transformers.LlamaForCausalLM(config).to(device).train()
    if spec["patched"]:
        cutce_transformers.patch(model, impl=spec["impl"])
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, spec["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, spec["steps"]))
    gen = torch.Generator().manual_seed(spec["data_seed"])  # same batches in every run
    progress = _Progress(spec["steps"], "cutce" if spec["patched"] else "original")
    seq = spec["seq_len"]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # Memory held before the first step (interpreter, libraries, data, model): the bar's lower part.
    base = torch.cuda.memory_allocated(device) / 2**20 if cuda else _peak_rss_mb()
    losses, t0 = [], None
    for step in range(spec["steps"]):
        if step == 1:  # the first step pays one-off costs (allocator warm-up, kernel compilation)
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        starts = torch.randint(0, ids.numel() - seq, (spec["batch"],), generator=gen)
        batch = torch.stack([ids[s:s + seq] for s in starts.tolist()]).long().to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.update(losses[-1])
    progress.close()
    if cuda:
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) * 1e3 / max(1, spec["steps"] - 1) if t0 else float("nan")
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "CUDA allocated"
    else:
        peak, kind = _peak_rss_mb(), "RSS"
    return dict(losses=losses, ms_per_step=ms, peak_mb=peak, base_mb=base, memory_kind=kind,
                logits_mb=spec["batch"] * seq * spec["vocab"] * 4 / 2**20)


class _Progress:
    """Per-step progress of one run: a tqdm bar on a terminal, else a line every 10 % of the steps."""

    def __init__(self, total, label):
        self.total, self.label, self.step, self.t0 = total, label, 0, time.perf_counter()
        self.bar = None
        if _terminal_columns() >= 40:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=f"  {label}", unit="step", leave=False,
                                dynamic_ncols=True)
        self.every = max(1, total // 10)

    def update(self, loss):
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.step % self.every == 0 or self.step == self.total:
            elapsed = time.perf_counter() - self.t0
            left = elapsed / self.step * (self.total - self.step)
            print(f"  {self.label}: step {self.step}/{self.total}, loss {loss:.4f}, "
                  f"{elapsed:.0f} s elapsed, ~{left:.0f} s left", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _terminal_columns():
    """Width of the terminal on stderr; 0 when stderr is not a terminal (or reports no size)."""
    import os

    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
    except (OSError, ValueError, AttributeError):
        return 0


def _lr_factor(step, warmup, total):
    """Linear warmup to 1, then cosine decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def _peak_rss_mb():
    try:
        import resource
    except ImportError:  # not on Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _transformers_version():
    import transformers

    return transformers.__version__


def plot(summary, path):
    """Loss curves, per-step |difference| and peak memory of every run, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, k, cfg = summary["runs"], summary["last_k"], summary["config"]
    names = [f"{r['label']} (seed {r['seed']})" for r in runs]
    colors = ["tab:blue", "tab:orange", "tab:gray"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8), width_ratios=[2.2, 2.2, 1.2])
    first = runs[0]["losses"]
    for i, (r, name, color) in enumerate(zip(runs, names, colors)):
        steps = range(1, len(r["losses"]) + 1)
        style = dict(color=color, lw=2.4, ls="-", zorder=2)  # the reference curve: wide
        if i == 1:  # cutce: thin and dashed on top, so the reference shows where they coincide
            gap = max(abs(a - b) for a, b in zip(r["losses"], first))
            name += f" (dashed, on top; max |Δ| vs {names[0]}: {gap:.2g})"
            style = dict(color=color, lw=1.1, ls=(0, (4, 2)), zorder=3)
        elif i == 2:
            style = dict(color=color, lw=1.0, ls="-", zorder=1)
        ax1.plot(steps, r["losses"], label=name, **style)
    ax1.set(xlabel="step", ylabel="training loss", title="loss (each curve: one run)")
    ax1.legend(fontsize=8)
    # Per-step |difference| on a log axis. Steps where the losses are bitwise equal (|Δ| = 0, which
    # a log axis cannot show) are drawn explicitly as markers on a floor line below the data.
    diffs = [[abs(a - b) for a, b in zip(r["losses"], first)] for r in runs[1:]]
    nonzero = [d for diff in diffs for d in diff if d > 0]
    floor = min(nonzero) / 10 if nonzero else 1e-9
    for r, name, color, diff in zip(runs[1:], names[1:], colors[1:], diffs):
        mean = mean_abs_diff(r["losses"], first, k)
        steps = range(1, len(diff) + 1)
        ax2.semilogy(steps, [d if d > 0 else float("nan") for d in diff], color=color, lw=0.8,
                     marker=".", ms=2.5,  # a nonzero step between two zeros is a lone point
                     label=f"{name} vs {names[0]}: last-{k} mean {mean:.3g}")
        zeros = [s for s, d in zip(steps, diff) if d == 0]
        if zeros:
            ax2.plot(zeros, [floor] * len(zeros), ls="none", marker="|", ms=9, color=color,
                     label=f"{name}: exactly 0 at {len(zeros)} of {len(diff)} steps (drawn at {floor:.0e})")
        if mean > 0:
            ax2.hlines(mean, len(diff) - k + 1, len(diff), color=color, lw=2.5)
    title = f"|Δ loss| per step (bars: mean of last {k}"
    if any(d == 0 for diff in diffs for d in diff):
        ax2.axhline(floor, color="0.6", lw=0.6, ls=":")
        title += "; ticks on the dotted line: Δ = 0"
    ax2.set(xlabel="step", ylabel="|loss difference|", title=title + ")")
    ax2.legend(fontsize=7, loc="center right")
    peaks = [r["peak_mb"] for r in runs]
    x = range(len(runs))
    bars = ax3.bar(x, peaks, color=colors[:len(runs)])
    ax3.bar(x, [r["base_mb"] for r in runs], color="white", alpha=0.55, hatch="//")
    for bar, r in zip(bars, runs):
        ax3.annotate(f"{r['peak_mb']:.0f} MB (+{r['peak_mb'] - r['base_mb']:.0f})\n"
                     f"{r['ms_per_step']:.0f} ms/step", (bar.get_x() + 0.4, bar.get_height()),
                     ha="center", va="bottom", fontsize=8)
    ax3.set_xticks(range(len(runs)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax3.set(ylabel=f"MB (peak {runs[0]['memory_kind']})",
            title="peak memory per run\n(hatched: held before the first step)")
    ax3.set_ylim(0, max(peaks) * 1.25 if all(map(math.isfinite, peaks)) else 1)
    fig.suptitle(f"cutce demo on {summary['device']}: Llama {cfg['layers']}x{cfg['hidden']}, "
                 f"V={cfg['vocab']} (BPE on the Python stdlib), {cfg['batch']}x{cfg['seq_len']} tokens "
                 f"per step; fp32 logits of one step: {runs[0]['logits_mb']:.0f} MB", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
