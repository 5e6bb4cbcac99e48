"""The one-GPU sections of the benchmark page: loss (and long context), log-probs, distillation,
the transformers training step and TRL's trainers. Each function takes one card's result files of
one benchmark, as (file name, document) pairs, and returns Markdown lines."""

from __future__ import annotations

import os

from page_format import brief, drop_empty, err, head_name, mib, ms, ratio, reproduce, source, table

DPI = 90

LOSS = """\
`linear_cross_entropy`: the linear layer and the cross-entropy (mean over tokens) at model heads'
shapes, on data like a trained model's (`zipf`: targets drawn from a skewed prior, each hidden
state pointing at its target). Rows:

- `cutce-triton`: cutce as shipped (Triton kernels on CUDA, the default `memory_budget`);
  `cutce-triton-auto`: `memory_budget="auto"`, larger chunks when the device has free memory;
  `cutce-triton-recompute`: `memory_budget=0`, the least memory (the backward computes the
  logits again: one more matmul).
- `torch`: eager `F.cross_entropy` on float32 logits; `torch-compile`: `torch.compile` of it.
- `liger`: Liger-Kernel's fused linear cross-entropy.
- `apple-cce`: Apple's Cut Cross-Entropy with its default gradient filtering, which skips small
  softmax entries (its gradients are inexact, marked "filtered"); `apple-cce-exact`: with
  `filter_eps=None`.
"""

LONG = """\
The same loss at 65536 tokens and a 262144-entry vocabulary, where float32 logits alone take
64 GiB: eager torch, which materializes them, runs out of memory.
"""

LOG_PROBS = """\
`linear_log_probs(..., return_entropy=True)`: per-token log-probabilities and entropy, what RL
losses (GRPO, PPO) take from the head. Forward+backward is that of `(logp * g1 + entropy *
g2).sum()` with random per-token `g1`, `g2`; errors against float32 log-probs from materialized
logits. Rows: `cutce` (default `memory_budget`), `cutce, memory_budget=auto`; `trl`: TRL's fused
LM head (`ChunkedLogProbFunction`); `torch-eager`: `log_softmax` of the float32 logits;
`torch-compile (inductor)`: `torch.compile` of it; "logp only": the log-probs without the
entropy. End to end: one training step of a small random-init Qwen2-like model,
`cutce.transformers.token_log_probs` against `model(...).logits` and a float32 `log_softmax`
(peak memory includes the parameters' gradients).
"""

TRUNCATED = """\
`linear_log_probs(..., return_entropy=True)` with a sampler's truncation: log-probs and entropy
of the top-k / top-p / min-p truncated, renormalised distribution, as RL learners score tokens
sampled that way. Forward+backward of `(logp * g1 + entropy * g2).sum()` (a dropped token's
`-inf` counts 0); ratios to cutce's untruncated call at the same shape (the first row); errors
against float64 log-probs from materialized logits of the same truncation. "kept ids": the mean
size of a token's kept set on this data (cutce's backward works from lists of the kept ids up to
256 a token on average, and recomputes the logits past that). Rows: `cutce <truncation>`;
`torch-eager`: the kept set and a masked `log_softmax` of float32 logits; `torch-compile`:
`torch.compile` of it.
"""

DISTILL = """\
`linear_distillation_loss`: a student head against a frozen teacher's, without either's logits.
beta 0 is the forward KL, 0.5 the Jensen-Shannon divergence. Rows: `cutce` (Triton kernels),
`cutce-torch` (`impl="torch"`); `trl`: TRL's `ChunkedDivergenceFunction`; `liger`: Liger's
`LigerFusedLinearJSDLoss`, `liger-fljsd`: its `LigerFusedLinearJSD`; `torch`: both heads'
logits materialized; `compile`: `torch.compile` of that. "peak / grads": the peak memory over
the size of the student's gradients, the least a backward allocates.
"""

SPARSE = """\
`linear_sparse_distillation_loss`: the student against a teacher stored as its top-K token ids
and log-probs per position (offline distillation), without the student's logits. Tails: "drop"
(the KL over the K ids as stored), "renormalize" (both renormalized over the K ids: no
full-vocabulary pass), "bucket" (the teacher's leftover mass as one more class). Rows: `cutce`
(Triton kernels), `torch`: the student's logits materialized, `log_softmax`, gathered at the ids,
`F.kl_div`; `compile`: `torch.compile` of that; `cutce-ce`: `linear_cross_entropy` at the same
shape, the yardstick (a full-vocabulary pass with gradients). Errors against cutce's torch path
on float32 copies.
"""

HF_STEP = """\
One training step of a Hugging Face causal LM, the original model against the same model patched
with `cutce.transformers.patch`, eager and under `torch.compile`.
"""


def loss_tables(docs, img_dir, img_rel) -> list[str]:
    """One table per result file: a file holds one shape on one card."""
    out = []
    for name, doc in docs:
        rows = [r for r in doc["rows"] if r.get("status") != "skipped"]
        if not rows:
            continue
        r0, meta = rows[0], doc["meta"]
        grads = (r0["n"] + r0["v"]) * r0["d"] * (4 if r0["dtype"] == "fp32" else 2) / 2**20
        out += [f"### {r0['shape']} on {doc['card']}", "",
                f"N={r0['n']} tokens, D={r0['d']}, V={r0['v']}{head_name(r0['d'], r0['v'])}, {r0['dtype']}, "
                f"{r0['data']} data (mean max-probability {r0['max_prob']:.2f}, entropy "
                f"{r0['entropy']:.2f} nats). One {r0['matmul_dtype']} matmul: {ms(r0['matmul_ms'])} ms; "
                f"dE and dC alone take {grads:.0f} MiB; errors against {r0['reference']}.", ""]
        cells = [[r["provider"] + ("" if r.get("exact", True) else " (filtered)"), ratio(r["fwd_ratio"]),
                  ms(r["fwdbwd_ms"]), ratio(r["fwdbwd_ratio"]), mib(r["peak_mb"]), err(r["de_err"]),
                  err(r["dc_err"])] for r in rows]
        out += table(["provider", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio", "peak MiB", "dE err",
                      "dC err"], cells)
        out += [f"  - {r['provider']}: {brief(r['error'])}" for r in rows if r.get("error")]
        png = os.path.splitext(name)[0] + ".png"  # one plot per result file
        ok = [r for r in rows if r.get("status") == "ok"]
        if ok and plot_loss(ok, meta, os.path.join(img_dir, png)):
            out += ["", f"![forward+backward time against peak memory, {r0['shape']} on {doc['card']}]"
                        f"({img_rel}/{png})"]
        providers = " ".join(dict.fromkeys(r["provider"] for r in rows))
        out += ["", source([(name, doc)]), "",
                reproduce([f"cutce bench --shape {r0['shape']} --data {r0['data']} --dtype {r0['dtype']} "
                           f"--providers {providers} --repeats {r0['repeats']} --warmup {r0['warmup']}"]), ""]
    return out


def plot_loss(rows, meta, path) -> bool:
    """Forward+backward time against peak memory, one point per provider; False without
    matplotlib or memory numbers."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from cutce.bench.plots import provider_color

    pts = [r for r in rows if r.get("fwdbwd_ms") is not None and r.get("peak_mb")]
    if not pts:
        return False
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    ax = fig.subplots()
    for r in pts:
        ax.scatter(r["peak_mb"], r["fwdbwd_ms"], s=36, color=provider_color(r["provider"]),
                   marker="o" if r.get("exact", True) else "x", zorder=3)
        ax.annotate(r["provider"], (r["peak_mb"], r["fwdbwd_ms"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    r0 = pts[0]
    ax.axhline(3 * r0["matmul_ms"], color="gray", linestyle="--", linewidth=1)
    ax.text(ax.get_xlim()[0], 3 * r0["matmul_ms"], " 3 matmuls", fontsize=7, color="gray", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("peak memory above the inputs, MiB (log)")
    ax.set_ylabel("forward+backward, ms")
    ax.set_ylim(0, max(r["fwdbwd_ms"] for r in pts) * 1.15)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"{meta.get('device_name')}: {r0['shape']} (N={r0['n']} D={r0['d']} V={r0['v']}), "
                 f"{r0['dtype']}; x = filtered gradients", fontsize=8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return True


def _flags(meta) -> str:
    return "".join(f" {k} {v}" if v is not True else f" {k}" for k, v in (meta.get("flags") or {}).items())


def log_probs_table(docs, card) -> list[str]:
    """One card's log-probs runs in one table, a column for the head when they measured several."""
    heads = [(name, doc, [r for r in doc["rows"] if r["section"] == "head"]) for name, doc in docs]
    heads = [h for h in heads if h[2]]
    e2e = [r for _, doc in docs for r in doc["rows"] if r["section"] == "e2e"]
    out = [f"### Log-probs on {card}", ""]
    for _, _, rows in heads:
        h = rows[0]
        unit = "" if h.get("matmul_ms") is None else f"; one bf16 matmul: {ms(h['matmul_ms'])} ms"
        out += [f"- Head N={h['n']} tokens, D={h['d']}, V={h['v']}{head_name(h['d'], h['v'])}, {h['dtype']}, "
                f"temperature {h['temperature']:g}{unit}."]
    several = len(heads) > 1
    header = (["head"] if several else []) + [
        "provider", "fwd ms", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio", "peak MiB", "logp err",
        "entropy err", "dE err", "dC err"]
    cells = [([f"{r['n']}x{r['d']}x{r['v']}"] if several else []) + [
        r["provider"], ms(r.get("fwd_ms")), ratio(r.get("fwd_ratio")), ms(r.get("fwd_bwd_ms")),
        ratio(r.get("fwd_bwd_ratio")), mib(r.get("peak_mib")), err(r.get("logp_err")),
        err(r.get("entropy_err")), err(r.get("dE_err")), err(r.get("dC_err"))]
        for _, _, rows in heads for r in rows]
    if cells:
        header, cells = drop_empty(header, cells, keep=(0, 1))
        out += [""] + table(header, cells, text=(0, 1) if several else (0,))
    out += [f"  - {r['provider']}: {r['note']}" for _, _, rows in heads for r in rows if r.get("note")]
    if e2e:
        out += ["", f"End to end: {e2e[0]['note'].split(', logits_to_keep')[0]}.", ""]
        out += table(["path", "tokens", "fwd ms", "fwd+bwd ms", "peak MiB", "logits_to_keep"],
                     [[r["provider"], r["n"], ms(r.get("fwd_ms")), ms(r.get("fwd_bwd_ms")),
                       mib(r.get("peak_mib")), r["note"].split("logits_to_keep=")[1].split(",")[0]]
                      for r in e2e], text=(0, 5))
    out += ["", source(docs), "",
            reproduce(f"python benchmarks/log_probs.py{_flags(doc['meta'])}" for _, doc in docs), ""]
    return out


def truncated_table(docs, card) -> list[str]:
    """One card's truncated log-probs run(s) in one table."""
    rows = [r for _, doc in docs for r in doc["rows"]]
    out = [f"### Truncated log-probs on {card}", ""]
    for n, d, v, dtype, temp in dict.fromkeys(
            (r["n"], r["d"], r["v"], r["dtype"], r["temperature"]) for r in rows):
        out += [f"Head N={n} tokens, D={d}, V={v}{head_name(d, v)}, {dtype}, temperature {temp:g}.",
                ""]
    cells = [[r["provider"], "" if r.get("kept_mean") is None else f"{r['kept_mean']:.1f}",
              ms(r.get("fwd_ms")), ratio(r.get("fwd_ratio")), ms(r.get("fwd_bwd_ms")),
              ratio(r.get("fwd_bwd_ratio")), mib(r.get("peak_mib")), err(r.get("logp_err")),
              err(r.get("entropy_err")), err(r.get("dE_err")), err(r.get("dC_err")),
              brief(r.get("note") or "")] for r in rows]
    header, cells = drop_empty(["provider", "kept ids", "fwd ms", "fwd ratio", "fwd+bwd ms",
                                "fwd+bwd ratio", "peak MiB", "logp err", "entropy err", "dE err",
                                "dC err", "note"], cells, keep=(0,))
    out += table(header, cells, text=(0, -1) if header[-1] == "note" else (0,))
    out += ["", source(docs), "",
            reproduce(f"python benchmarks/truncated.py{_flags(doc['meta'])}" for _, doc in docs), ""]
    return out


def distill_table(docs, card) -> list[str]:
    """One card's distillation runs (one file per beta) in one table."""
    docs = sorted(docs, key=lambda nd: min(r["beta"] for r in nd[1]["rows"]))
    rows = sorted((r for _, doc in docs for r in doc["rows"]), key=lambda r: r["beta"])
    out = [f"### Distillation on {card}", ""]
    for s in dict.fromkeys((r["n"], r["ds"], r["dt"], r["v"], r["dtype"], r["temperature"], r["grads_mib"])
                           for r in rows):
        n, ds, dt, v, dtype, temp, grads = s
        out += [f"Student D={ds}, teacher D={dt}, V={v}{head_name(ds, v)}, N={n} tokens, {dtype}, "
                f"temperature {temp:g}; the student's gradients alone take {grads:.0f} MiB; errors "
                "against cutce's torch path on float32 copies.", ""]
    kinds = {0.0: "forward KL", 1.0: "reverse KL"}
    cells = [[f"{kinds.get(r['beta'], 'JSD')} (beta {r['beta']:g})", r["provider"], ms(r.get("ms")),
              mib(r.get("peak_mib")), "" if not r.get("peak_mib") else f"{r['peak_mib'] / r['grads_mib']:.2f}x",
              err(r.get("loss_err")), err(r.get("dE_err")), err(r.get("dC_err")),
              r.get("note", "") if r.get("status") == "ok" else f"{r['status']}: {r.get('note', '')}"]
             for r in rows]
    header, cells = drop_empty(["loss", "provider", "fwd+bwd ms", "peak MiB", "peak / grads", "loss err",
                                "dE err", "dC err", "note"], cells, keep=(0, 1))
    out += table(header, cells, text=(0, 1, 8))
    betas = lambda doc: ",".join(dict.fromkeys(f"{r['beta']:g}" for r in doc["rows"]))  # noqa: E731
    out += ["", source(docs), "",
            reproduce(f"python benchmarks/distill.py --betas {betas(doc)}" for _, doc in docs), ""]
    return out


def sparse_distill_table(docs, card) -> list[str]:
    """One card's sparse-teacher distillation run(s)."""
    rows = [r for _, doc in docs for r in doc["rows"]]
    out = [f"### Sparse-teacher distillation on {card}", ""]
    for n, d, v, k, dtype, temp, grads in dict.fromkeys(
            (r["n"], r["d"], r["v"], r["k"], r["dtype"], r["temperature"], r["grads_mib"])
            for r in rows):
        out += [f"Student D={d}, V={v}{head_name(d, v)}, N={n} tokens, K={k} stored ids per "
                f"token, {dtype}, temperature {temp:g}; the student's gradients alone take "
                f"{grads:.0f} MiB.", ""]
    cells = [[r["tail"], r["provider"], ms(r.get("ms")), mib(r.get("peak_mib")),
              "" if not r.get("peak_mib") else f"{r['peak_mib'] / r['grads_mib']:.2f}x",
              err(r.get("loss_err")), err(r.get("dE_err")), err(r.get("dC_err")),
              r.get("note", "") if r.get("status") == "ok" else f"{r['status']}: {r.get('note', '')}"]
             for r in rows]
    header, cells = drop_empty(["tail", "provider", "fwd+bwd ms", "peak MiB", "peak / grads",
                                "loss err", "dE err", "dC err", "note"], cells, keep=(0, 1))
    out += table(header, cells, text=(0, 1, 8))
    out += ["", source(docs), "", reproduce(["python benchmarks/sparse_distill.py"]), ""]
    return out


def hf_step_table(docs, card) -> list[str]:
    out = [f"### Training step on {card}", ""]
    for name, doc in docs:
        r0 = doc["rows"][0]
        out += [f"Llama, hidden {r0['hidden']}, {r0['layers']} layers, V={r0['vocab']}, {r0['dtype']}, "
                f"batch {r0['batch']} x {r0['seq']}; compile backend {r0['backend']}; mean of "
                f"{r0['steps']} steps.", ""]
        out += table(["model", "compiled", "first step s", "ms/step", "peak MiB", "Δ loss", "grad err"],
                     [[r["variant"], "yes" if r["compiled"] else "no", f"{r['first_s']:.1f}", ms(r["ms"]),
                       mib(r.get("peak_mib")), err(r["dloss"]), err(r["grad_rel_err"])]
                      for r in doc["rows"]], text=(0, 1))
        out += [""]
    out += [source(docs), "", reproduce(["python benchmarks/hf_step.py"]), ""]
    return out


def _setting(s) -> str:
    return (f"Random weights with the models' shapes, {s.get('dtype')}, gradient checkpointing "
            f"{'on' if s.get('grad_ckpt') else 'off'}; SFT {s.get('sft_batch')} x {s.get('sft_seq')} "
            f"tokens, DPO {s.get('dpo_pairs')} pairs x {s.get('dpo_seq')}, GRPO {s.get('grpo_gens')} "
            f"completions of {s.get('grpo_prompt')} + {s.get('grpo_completion')} tokens; median of "
            f"{s.get('steps')} steps.")


TRAINERS = """\
One training step of TRL's SFT, DPO and GRPO trainers (forward, loss and backward; no
optimizer step) at the shapes of Qwen2.5-0.5B and Llama-3.2-1B. Heads: `trl-fused`: TRL's fused
LM head; `trl-plain`: TRL's log-probs from the model's full logits; `cutce`:
`cutce.trl.patch()`; `cutce-auto`: `cutce.trl.patch(memory_budget="auto")`. Peak memory
counts all that is allocated (weights, gradients, DPO's reference model); logp err: the largest
absolute error of the policy's per-token log-probs against float32 from the same hidden states.
"""


def trainers_table(docs, card) -> list[str]:
    """One card's trainer runs (a file per model or trainer split) in one table."""
    out = [f"### Trainer steps on {card}", ""]
    settings = [doc["meta"].get("setting", {}) for _, doc in docs]
    out += [_setting(s) for i, s in enumerate(settings) if s not in settings[:i]]
    rows = [r for _, doc in docs for r in doc["rows"]]
    fused = {(r["trainer"], r["model"]): r["ms"] for r in rows if r["mode"] == "trl-fused" and r.get("ms")}
    cells = []
    for r in rows:
        base = fused.get((r["trainer"], r["model"]))
        ok = r["status"] == "ok"
        cells.append([r["trainer"], r["model"], r["mode"], r.get("tokens") or "",
                      ms(r["ms"]) if ok else r["status"], ratio(r["ms"] / base) if ok and base else "",
                      mib(r.get("peak_mib")), "" if r.get("loss") is None else f"{r['loss']:.4f}",
                      err(r.get("logp_err"))])
    out += [""] + table(["trainer", "model", "head", "tokens", "ms/step", "vs trl-fused", "peak MiB", "loss",
                         "logp err"], cells, text=(0, 1, 2))
    commands = []
    for name, doc in docs:
        flags = ""
        if name.count("_") > 1:  # a run split by --models / --trainers (trainers.py names its file so)
            flags = "".join(f" --{k}s " + ",".join(dict.fromkeys(r[k] for r in doc["rows"]))
                            for k in ("model", "trainer"))
        commands.append(f"python benchmarks/trainers.py{flags}")
    out += ["", source(docs), "", reproduce(commands), ""]
    return out
