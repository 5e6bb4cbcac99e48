"""Generate docs/benchmarks.md and its plots from the result files in benchmarks/results/.

    python benchmarks/page.py                      # results -> docs/benchmarks.md + docs/img/*.png
    python benchmarks/page.py --results DIR --out OUT.md --img IMG_DIR

Every table says where its numbers come from (device, versions, date and commit, from the result
file's meta) and the command that reproduces it; the page is never edited by hand, so that a
number on it is always one a result file holds. Files of the same benchmark are ordered by name.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The plots take the providers' colours from the harness; a results folder alone needs only the
# source tree, not an installed cutce.
sys.path.insert(0, os.path.join(ROOT, "src"))

KINDS = ("loss", "log_probs", "distill", "multi_gpu", "hf_step", "trainers")
DPI = 90


def load(results_dir) -> dict:
    """benchmark name -> list of (file name, document), sorted by file name."""
    found = {k: [] for k in KINDS}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("benchmark") not in found:
            raise ValueError(f"{path}: expected a result file with benchmark one of {KINDS}")
        found[doc["benchmark"]].append((os.path.basename(path), doc))
    return found


# --- cells -----------------------------------------------------------------------------------

def ms(x):
    return "" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def brief(error: str) -> str:
    """An error cell's gist: an out-of-memory row says how much it asked for, once (the
    allocator's message repeats per pass and runs to several lines)."""
    m = re.search(r"OutOfMemoryError: CUDA out of memory\. Tried to allocate ([\d.]+ [GM]iB)", error)
    return f"out of memory (tried to allocate {m.group(1)})" if m else error


def ratio(x):
    return "" if x is None else f"{x:.2f}x"


def mib(x):
    return "" if x is None else f"{x:.0f}"


def err(x):
    return "" if x is None else f"{x:.1e}"


def table(header, rows, text=(0,)) -> list[str]:
    """A Markdown table; the columns at the indices in `text` are left-aligned, the numbers right."""
    align = ["---" if i in text or i - len(header) in text else "---:" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def card(meta) -> str:
    """The GPU's short name for headings ("H100" from "NVIDIA H100 80GB HBM3"): runs of one
    shape on two cards differ by a few percent, so a table names its card."""
    name = meta.get("device_name") or meta.get("device") or "n/a"
    return next((w for w in name.split() if w[:1] in "ABHL" and w[1:4].isdigit()), name)


def source(meta, name) -> str:
    """The line under every table: where its numbers come from."""
    peers = meta.get("peers") or {}
    peers = ", ".join(f"{k} {v}" for k, v in peers.items()) if isinstance(peers, dict) else str(peers)
    cuda = f", CUDA {meta['cuda']}" if meta.get("cuda") not in (None, "n/a") else ""
    return (f"*{meta.get('device_name', meta.get('device'))}; torch {meta.get('torch')}, triton "
            f"{meta.get('triton')}{cuda}, cutce {meta.get('cutce')} at commit `{meta.get('commit')}`; "
            f"peers: {peers or 'none'}; {str(meta.get('date', ''))[:10]}; "
            f"file `benchmarks/results/{name}`.*")


# --- sections --------------------------------------------------------------------------------

HOW = """\
## How the numbers are measured

- **Time**: the median of `repeats` calls after `warmup` untimed ones (compilation, autotuning),
  timed with CUDA events (`time.perf_counter` on CPU). Forward is the loss alone under
  `torch.no_grad()`; forward+backward is the loss and `backward()` into fresh gradients, so
  allocating the gradients is part of the work, as in a training step.
- **Ratio**: the time divided by that of one bf16 `hidden @ weight.T` of the same shape, measured in
  the same run. A forward cannot be much below 1x (it has to do that product); a forward+backward
  near 3x does the three products (logits, dE, dC) and little else.
- **Peak memory**: the CUDA allocator's peak during one separate forward+backward call minus what
  was allocated before it: the inputs do not count, the gradients dE and dC do.
- **Errors**: the relative norm `||x - ref|| / ||ref||` of the loss (or log-probs, entropy) and of
  the gradients dE (hidden) and dC (classifier) against a float32 reference on upcast inputs
  (float64 on CPU). A bf16 eager implementation sits near 1e-3 to 5e-3 for the gradients.
- **Noise**: times of the same code moved by a few percent between calls and processes on the
  H200; read ratios to about ±0.1x.
- **Where**: the GPU tables come from `bash benchmarks/device.sh loss|log-probs|distill` on one
  GPU; copy the JSON it writes into `benchmarks/results/` and run `python benchmarks/page.py`.
"""

MODES = """\
## Modes

- `cutce-triton`: cutce's default on CUDA (`impl="auto"`, default `memory_budget`): the fused
  strategy, three GEMMs (logits, dE, dC) per chunk of tokens, dE and dC formed in the forward,
  with extra memory within the budget (a multiple of the inputs' size).
- `cutce-triton-auto`: `memory_budget="auto"`: the budget is what the device's free memory leaves
  (less a margin), so the fused strategy takes larger chunks when memory is there.
- `cutce-triton-recompute`: `memory_budget=0`, the minimum-memory mode: the recompute strategy,
  the forward keeps O(N) values and the backward recomputes the logit tiles (four GEMMs).
- `apple-cce`: Apple's Cut Cross-Entropy with its default gradient filtering (inexact gradients:
  small softmax entries are skipped); `apple-cce-exact`: `filter_eps=None`, its unfiltered mode in
  version 25.1.1 (no `cce_exact` there); its dE error shows it still drops part of the softmax tail.
- `torch`: eager `F.cross_entropy((hidden @ weight.T).float())`; `torch-compile`:
  `torch.compile` of it; `liger`: Liger-Kernel's fused linear cross-entropy.
"""


def loss_section(docs, img_dir, img_rel) -> list[str]:
    out = ["## Loss: linear + cross-entropy", ""]
    # one shape's runs together, by card, then oldest first
    docs = sorted(docs, key=lambda nd: (nd[1]["rows"][0]["shape"] if nd[1]["rows"] else "",
                                        card(nd[1]["meta"]), nd[1]["meta"].get("date", "")))
    for name, doc in docs:
        rows = [r for r in doc["rows"] if r.get("status") != "skipped"]
        if not rows:
            continue
        r0, meta = rows[0], doc["meta"]
        ok = [r for r in rows if r.get("status") == "ok"]
        grads = (r0["n"] + r0["v"]) * r0["d"] * (4 if r0["dtype"] == "fp32" else 2) / 2**20
        # the commit in the heading tells apart runs of one shape (a full run and a later re-check)
        out += [f"### {r0['shape']} on {card(meta)}: N={r0['n']}, D={r0['d']}, V={r0['v']}, {r0['data']} data, "
                f"{r0['dtype']}; commit {meta.get('commit', 'n/a')}", ""]
        out += [f"One {r0['matmul_dtype']} matmul: {ms(r0['matmul_ms'])} ms; dE + dC alone take "
                f"{grads:.0f} MiB; mean max-prob {r0['max_prob']:.2f}, entropy {r0['entropy']:.2f} nats; "
                f"errors against {r0['reference']}.", ""]
        cells = [[r["provider"] + ("" if r.get("exact", True) else " (filtered)"), ratio(r["fwd_ratio"]),
                  ms(r["fwdbwd_ms"]), ratio(r["fwdbwd_ratio"]), mib(r["peak_mb"]), err(r["de_err"]),
                  err(r["dc_err"])] for r in rows]
        out += table(["provider", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio", "peak MiB", "dE err",
                      "dC err"], cells)
        out += [f"  - {r['provider']}: {brief(r['error'])}" for r in rows if r.get("error")]
        png = os.path.splitext(name)[0] + ".png"  # one plot per result file
        if ok and plot_loss(ok, meta, os.path.join(img_dir, png)):
            out += ["", f"![forward+backward time against peak memory, {r0['shape']}]({img_rel}/{png})"]
        providers = " ".join(dict.fromkeys(r["provider"] for r in rows))
        out += ["", source(meta, name), "",
                f"Reproduce: `cutce bench --shape {r0['shape']} --data {r0['data']} --dtype {r0['dtype']} "
                f"--providers {providers} --repeats {r0['repeats']} --warmup {r0['warmup']}`", ""]
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


def log_probs_section(docs) -> list[str]:
    out = ["## Log-probs and entropy (RL)", ""]
    for name, doc in docs:
        meta, rows = doc["meta"], doc["rows"]
        head = [r for r in rows if r["section"] == "head"]
        e2e = [r for r in rows if r["section"] == "e2e"]
        if head:
            h = head[0]
            out += [f"### {card(meta)}: N={h['n']}, D={h['d']}, V={h['v']}", "",
                    f"Head: N={h['n']}, D={h['d']}, V={h['v']}, {h['dtype']}, temperature "
                    f"{h['temperature']}; per-token log-probs and entropy, forward+backward of "
                    "`(logp * g1 + entropy * g2).sum()`; errors against float32 from materialized logits.", ""]
            header = ["provider", "fwd ms", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio", "peak MiB",
                      "logp err", "entropy err", "dE err", "dC err"]
            cells = [[r["provider"], ms(r.get("fwd_ms")), ratio(r.get("fwd_ratio")), ms(r.get("fwd_bwd_ms")),
                      ratio(r.get("fwd_bwd_ratio")), mib(r.get("peak_mib")), err(r.get("logp_err")),
                      err(r.get("entropy_err")), err(r.get("dE_err")), err(r.get("dC_err"))] for r in head]
            if h.get("matmul_ms") is None:  # measured before the matmul unit was part of this benchmark
                keep = [i for i in range(len(header)) if "ratio" not in header[i]]
                header, cells = [header[i] for i in keep], [[c[i] for i in keep] for c in cells]
            else:
                out += [f"One bf16 matmul of the shape: {ms(h['matmul_ms'])} ms.", ""]
            out += table(header, cells)
            out += [f"  - {r['provider']}: {r['note']}" for r in head if r.get("note")]
        if e2e:
            out += ["", f"End to end: {e2e[0]['note'].split(', logits_to_keep')[0]}; one training step "
                    "of `cutce.transformers.token_log_probs` against `model(...).logits` + float32 "
                    "log_softmax (peak memory includes the parameters' gradients).", ""]
            out += table(["path", "tokens", "fwd ms", "fwd+bwd ms", "peak MiB", "logits_to_keep"],
                         [[r["provider"], r["n"], ms(r.get("fwd_ms")), ms(r.get("fwd_bwd_ms")),
                           mib(r.get("peak_mib")), r["note"].split("logits_to_keep=")[1].split(",")[0]]
                          for r in e2e], text=(0, 5))
        note = f" ({meta['trl_note']})" if meta.get("trl_note") else ""
        flags = "".join(f" {k} {v}" if v is not True else f" {k}" for k, v in (meta.get("flags") or {}).items())
        out += ["", source(meta, name) + note, "", f"Reproduce: `python benchmarks/log_probs.py{flags}`", ""]
    return out


def distill_section(docs) -> list[str]:
    out = ["## Distillation", ""]
    # By beta, whichever file holds it (one run per beta keeps each run short).
    tables = sorted({(r["beta"], name) for name, doc in docs for r in doc["rows"]})
    files = dict(docs)
    for beta, name in tables:
        meta = files[name]["meta"]
        rs = [r for r in files[name]["rows"] if r["beta"] == beta]
        r0 = rs[0]
        kind = {0.0: "forward KL", 1.0: "reverse KL"}.get(beta, "JSD")
        out += [f"### beta = {beta:g} ({kind}); commit {meta.get('commit', 'n/a')}", "",
                f"Student D={r0['ds']}, teacher D={r0['dt']}, V={r0['v']}, N={r0['n']} tokens, "
                f"{r0['dtype']}, frozen teacher, temperature {r0['temperature']:g}; the student's "
                f"gradients alone take {r0['grads_mib']:.0f} MiB; errors against cutce's torch path "
                "on float32 copies.", ""]
        cells = [[r["provider"], ms(r.get("ms")), mib(r.get("peak_mib")),
                  "" if not r.get("peak_mib") else f"{r['peak_mib'] / r0['grads_mib']:.2f}x",
                  err(r.get("loss_err")), err(r.get("dE_err")), err(r.get("dC_err")),
                  r.get("note", "") if r.get("status") == "ok" else f"{r['status']}: {r.get('note', '')}"]
                 for r in rs]
        out += table(["provider", "fwd+bwd ms", "peak MiB", "peak / grads", "loss err", "dE err",
                      "dC err", "note"], cells, text=(0, 7))
        out += ["", source(meta, name), "",
                f"Reproduce: `python benchmarks/distill.py --betas {beta:g}`", ""]
    return out


def multi_gpu_section(docs) -> list[str]:
    out = ["## Vocabulary-parallel (several GPUs)", ""]
    for name, doc in docs:
        meta = doc["meta"]
        timing = [r for r in doc["rows"] if r["kind"] == "timing"]
        out += [f"{meta['world']} ranks ({meta['backend']}, impl={meta['impl']}): {meta['checks']} "
                f"equivalence checks against the single-device call, {meta['failed']} failed.", ""]
        if timing:
            out += table(["N", "D", "V", "rank", "vocabulary rows", "single-device ms", "parallel ms",
                          "ratio", "peak GiB"],
                         [[r["N"], r["D"], r["V"], r["rank"], r["rows_here"], ms(r["single_ms"]),
                           ms(r["vp_ms"]), f"{r['ratio']:.3f}",
                           "" if r.get("peak_GiB") is None else f"{r['peak_GiB']:.2f}"] for r in timing])
        out += ["", source(meta, name), "",
                f"Reproduce: `python benchmarks/multi_gpu.py --gpus {meta['world']}`", ""]
    return out


def hf_step_section(docs) -> list[str]:
    out = ["## End-to-end training step (transformers)", ""]
    for name, doc in docs:
        meta, rows = doc["meta"], doc["rows"]
        r0 = rows[0]
        out += [f"Llama, hidden {r0['hidden']}, {r0['layers']} layers, V={r0['vocab']}, {r0['dtype']}, "
                f"batch {r0['batch']} x {r0['seq']}; compile backend {r0['backend']}; mean of "
                f"{r0['steps']} steps.", ""]
        out += table(["model", "compiled", "first step s", "ms/step", "peak MiB", "Δ loss", "grad err"],
                     [[r["variant"], "yes" if r["compiled"] else "no", f"{r['first_s']:.1f}", ms(r["ms"]),
                       mib(r.get("peak_mib")), err(r["dloss"]), err(r["grad_rel_err"])] for r in rows], text=(0, 1))
        out += ["", source(meta, name), "", "Reproduce: `python benchmarks/hf_step.py`", ""]
    return out


def trainers_section(docs) -> list[str]:
    out = ["## TRL trainers: one training step", ""]
    for name, doc in docs:
        meta, rows = doc["meta"], doc["rows"]
        s = meta.get("setting", {})
        out += [f"Random weights with the models' shapes, {s.get('dtype')}, gradient checkpointing "
                f"{'on' if s.get('grad_ckpt') else 'off'}; SFT {s.get('sft_batch')} x {s.get('sft_seq')} "
                f"tokens, DPO {s.get('dpo_pairs')} pairs x {s.get('dpo_seq')}, GRPO {s.get('grpo_gens')} "
                f"completions of {s.get('grpo_prompt')} + {s.get('grpo_completion')} tokens; median of "
                f"{s.get('steps')} steps. `trl-fused`: TRL's fused LM head; `trl-plain`: TRL's log-probs "
                "from the model's full logits; `cutce`: `cutce.trl.patch()`; `cutce-auto`: "
                "`cutce.trl.patch(memory_budget=\"auto\")`. Peak memory: all that is "
                "allocated (weights, gradients, DPO's reference model); logp err: the max abs error of "
                "the policy's per-token log-probs against float32 from the same hidden states.", ""]
        fused = {(r["trainer"], r["model"]): r["ms"] for r in rows
                 if r["mode"] == "trl-fused" and r.get("ms")}
        cells = []
        for r in rows:
            base = fused.get((r["trainer"], r["model"]))
            ok = r["status"] == "ok"
            cells.append([r["trainer"], r["model"], r["mode"], r.get("tokens") or "",
                          ms(r["ms"]) if ok else r["status"], ratio(r["ms"] / base) if ok and base else "",
                          mib(r.get("peak_mib")), "" if r.get("loss") is None else f"{r['loss']:.4f}",
                          err(r.get("logp_err"))])
        out += table(["trainer", "model", "head", "tokens", "ms/step", "vs trl-fused", "peak MiB", "loss",
                      "logp err"], cells, text=(0, 1, 2))
        flags = ""
        if name.count("_") > 1:  # a run split by --models / --trainers (trainers.py names its file so)
            flags = "".join(f" --{k}s " + ",".join(dict.fromkeys(r[k] for r in rows))
                            for k in ("model", "trainer"))
        out += ["", source(meta, name), "", f"Reproduce: `python benchmarks/trainers.py{flags}`", ""]
    return out


def render(results_dir, out_md, img_dir) -> str:
    found = load(results_dir)
    img_rel = os.path.relpath(img_dir, os.path.dirname(os.path.abspath(out_md)))
    lines = ["<!-- Generated by benchmarks/page.py from benchmarks/results/*.json: do not edit; "
             "rerun `python benchmarks/page.py`. -->", "", "# Benchmarks", "",
             "Time, peak memory and accuracy of cutce against its peers, from the result files in "
             "`benchmarks/results/` (written by `cutce bench` and the scripts in `benchmarks/`; "
             "`benchmarks/README.md` says what each measures). Each table names the device, "
             "versions, date and commit it was measured with, and the command that reproduces it.", "",
             HOW, MODES]
    if found["loss"]:
        lines += loss_section(found["loss"], img_dir, img_rel)
    if found["log_probs"]:
        lines += log_probs_section(found["log_probs"])
    if found["distill"]:
        lines += distill_section(found["distill"])
    if found["multi_gpu"]:
        lines += multi_gpu_section(found["multi_gpu"])
    if found["hf_step"]:
        lines += hf_step_section(found["hf_step"])
    if found["trainers"]:
        lines += trainers_section(found["trainers"])
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    with open(out_md, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return out_md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--img", default=None, help="folder of the plots (default: img/ next to --out)")
    args = ap.parse_args(argv)
    img = args.img or os.path.join(os.path.dirname(os.path.abspath(args.out)), "img")
    print(f"wrote {render(args.results, args.out, img)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
