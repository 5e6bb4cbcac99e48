"""Generate docs/benchmarks.md and its plots from the result files in benchmarks/results/.

    python benchmarks/page.py                      # results -> docs/benchmarks.md + docs/img/*.png
    python benchmarks/page.py --results DIR --out OUT.md --img IMG_DIR

The page shows one current run per benchmark, card and shape: a result file replaces the older run
of what it measures (git keeps that one), and two files that measure the same thing on the same
card are an error, not two tables. Runs of one benchmark on one card share a table where their
shapes differ. Every table says where its numbers come from (device, versions, date and commit,
from the result file's meta) and the command that reproduces it; the page is never edited by hand,
so that a number on it is always one a result file holds. The tables live in page_single.py and
page_multi.py, the run-to-run spread (files of benchmarks/repeats.py) in page_noise.py.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The plots take the providers' colours from the harness; a results folder alone needs only the
# source tree, not an installed cutce.
sys.path.insert(0, os.path.join(ROOT, "src"))

import page_multi  # noqa: E402
import page_noise  # noqa: E402
import page_single  # noqa: E402
from page_format import card  # noqa: E402

# What one row measured, per benchmark: two files of one card may not share a key.
KEYS = {
    "loss": lambda m, r: (r["shape"], r["n"], r["data"], r["dtype"]),
    "log_probs": lambda m, r: (r["n"], r["d"], r["v"]) if r["section"] == "head" else ("end to end",),
    "truncated": lambda m, r: (r["provider"], r["n"], r["d"], r["v"]),
    "distill": lambda m, r: (r["beta"], r["n"], r["ds"], r["dt"], r["v"]),
    "sparse_distill": lambda m, r: (r["tail"], r["provider"], r["n"], r["d"], r["v"], r["k"]),
    "trainers": lambda m, r: (r["trainer"], r["model"]),
    "hf_step": lambda m, r: ("step",),
    "multi_gpu": lambda m, r: (m.get("world"),),
    "fsdp": lambda m, r: (m.get("world"),),
    "repeats": None,  # not a table: the spread section reads it
}
LONG_CONTEXT = 32768  # tokens from which a loss shape goes to the long-context section


def load(results_dir) -> dict:
    """benchmark -> card -> [(file name, document)], sorted by file name; each document gets its
    card. Raises ValueError for a file that is no result, or that measures what another file of
    the same card measures."""
    found = {k: {} for k in KEYS}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("benchmark") not in found:
            raise ValueError(f"{path}: expected a result file with benchmark one of {tuple(KEYS)}")
        doc["card"] = card(doc["meta"])
        found[doc["benchmark"]].setdefault(doc["card"], []).append((os.path.basename(path), doc))
    for bench, by_card in found.items():
        if KEYS[bench] is None:
            continue
        for c, docs in by_card.items():
            owner = {}
            for name, doc in docs:
                for key in {KEYS[bench](doc["meta"], r) for r in doc["rows"]}:
                    if key in owner:
                        raise ValueError(
                            f"{owner[key]} and {name} both hold {bench} {key} on {c}: keep the newer run "
                            "in benchmarks/results (git keeps the older)")
                    owner[key] = name
    return {bench: dict(sorted(by_card.items())) for bench, by_card in found.items()}


INTRO = """\
How fast cutce computes a language model's head, how much memory it takes and how accurate it is,
next to the other ways to compute the same thing, on NVIDIA H100 (80GB HBM3) and H200 GPUs. Every
table comes from a result file in `benchmarks/results/` and says the card, versions, date and
commit it was measured with and the command that reproduces it; `benchmarks/README.md` explains
the scripts.
"""


def how(noise_docs) -> list[str]:
    return ["## How it is measured", "",
            "- **Time**: the median of `repeats` calls after `warmup` untimed ones (compilation, "
            "autotuning), timed with CUDA events. *fwd* is the forward alone, without autograd; "
            "*fwd+bwd* is the forward and the backward into fresh gradients, so allocating them "
            "counts, as in a training step.",
            "- **Ratio**: the time divided by that of one bf16 `hidden @ weight.T` of the same shape, "
            "measured in the same run. A forward cannot be much below 1x (it has to do that product); "
            "a forward+backward near 3x does the three products (logits, dE, dC) and little else.",
            "- **Peak memory**: the CUDA allocator's peak during the call minus what was allocated "
            "before it: the inputs do not count, the gradients dE and dC do.",
            "- **Errors**: the relative norm `||x - ref|| / ||ref||` of the loss (or log-probs, "
            "entropy) and of the gradients dE (hidden) and dC (classifier) against a float32 "
            "reference on the same inputs. A bf16 implementation sits near 1e-3 to 5e-3 for the "
            "gradients.",
            "- " + page_noise.summary(noise_docs), ""]


def _per_card(text, by_card, table) -> list[str]:
    return [text] + [line for c, docs in by_card.items() for line in table(docs, c)]


def _files(by_card) -> list:
    return [nd for docs in by_card.values() for nd in docs]


def render(results_dir, out_md, img_dir) -> str:
    found = load(results_dir)
    img_rel = os.path.relpath(img_dir, os.path.dirname(os.path.abspath(out_md)))
    noise = _files(found["repeats"])
    loss = sorted((nd for nd in _files(found["loss"]) if nd[1]["rows"]),
                  key=lambda nd: (nd[1]["rows"][0]["n"], nd[1]["rows"][0]["shape"], nd[1]["card"]))
    short = [nd for nd in loss if nd[1]["rows"][0]["n"] < LONG_CONTEXT]
    long = [nd for nd in loss if nd[1]["rows"][0]["n"] >= LONG_CONTEXT]
    single = page_single
    # (heading, whether there is anything to show, its body)
    sections = [
        ("Loss: linear + cross-entropy", short,
         lambda: [single.LOSS] + single.loss_tables(short, img_dir, img_rel)),
        ("Long context", long, lambda: [single.LONG] + single.loss_tables(long, img_dir, img_rel)),
        ("Log-probs and entropy (RL)", found["log_probs"],
         lambda: _per_card(single.LOG_PROBS, found["log_probs"], single.log_probs_table)),
        ("Truncated log-probs (top-k, top-p, min-p)", found["truncated"],
         lambda: _per_card(single.TRUNCATED, found["truncated"], single.truncated_table)),
        ("Distillation", found["distill"],
         lambda: _per_card(single.DISTILL, found["distill"], single.distill_table)),
        ("Sparse-teacher distillation", found["sparse_distill"],
         lambda: _per_card(single.SPARSE, found["sparse_distill"], single.sparse_distill_table)),
        ("TRL trainers: one training step", found["trainers"],
         lambda: _per_card(single.TRAINERS, found["trainers"], single.trainers_table)),
        ("End-to-end training step (transformers)", found["hf_step"],
         lambda: _per_card(single.HF_STEP, found["hf_step"], single.hf_step_table)),
        ("Multi-GPU", found["multi_gpu"] or found["fsdp"],
         lambda: page_multi.section(_files(found["multi_gpu"]), _files(found["fsdp"]))),
        ("Run-to-run spread", noise, lambda: page_noise.section(noise)),
    ]
    shown = [(title, body) for title, present, body in sections if present]
    lines = ["<!-- Generated by benchmarks/page.py from benchmarks/results/*.json: do not edit; "
             "rerun `python benchmarks/page.py`. -->", "", "# Benchmarks", "", INTRO,
             "Sections: " + " · ".join(f"[{t}](#{anchor(t)})" for t, _ in shown), ""]
    lines += how(noise)
    for title, body in shown:
        lines += [f"## {title}", ""] + body()
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    with open(out_md, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return out_md


def anchor(title) -> str:
    """The heading's anchor as GitHub makes it."""
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


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
