"""The multi-GPU sections of the benchmark page: the vocabulary-parallel loss and FSDP2 training.
Each function takes one result file, (file name, document), and returns Markdown lines."""

from __future__ import annotations

import statistics

from page_format import err, head_name, ms, reproduce, source, table

MULTI_GPU = """\
Several GPUs of one host over NCCL, with NVLink multicast off.
"""


def section(vocab_parallel_files, fsdp_files) -> list[str]:
    return ([MULTI_GPU] + [line for nd in vocab_parallel_files for line in vocab_parallel(*nd)]
            + [line for nd in fsdp_files for line in fsdp(*nd)])


def vocab_parallel(name, doc) -> list[str]:
    meta = doc["meta"]
    world = meta["world"]
    checks = [r for r in doc["rows"] if r["kind"] == "check"]
    timing = [r for r in doc["rows"] if r["kind"] == "timing"]
    out = [f"### Vocabulary-parallel loss on {world} x {doc['card']}", "",
           f"`linear_cross_entropy(..., vocab_group=group)`: each GPU holds a contiguous slice of the "
           f"classifier, hidden states and targets are the same on every GPU. {meta['checks']} "
           "equivalence checks (loss, lse, dE, dC and dbias, bf16 and fp32, every option) against the "
           f"one-GPU call on the whole weight (`impl=\"{meta['impl']}\"`): {meta['failed']} failed.", ""]
    out += [f"  - failed: rank {r['rank']}, {r['case']}, {r['dtype']}, {r['part']}"
            for r in checks if not r["ok"]]
    if timing:
        out += ["Forward+backward, bf16, the median of the timed calls, run on every GPU at once; the one-GPU "
                "call holds the whole vocabulary, each GPU of the parallel call its slice. The parallel "
                "time is the slowest GPU's; the bytes are what a ring moves per GPU and call.", ""]
        cells = []
        for n in dict.fromkeys(r["N"] for r in timing):
            rs = [r for r in timing if r["N"] == n]
            r0 = rs[0]
            single = statistics.median(r["single_ms"] for r in rs)
            vp = max(r["vp_ms"] for r in rs)
            peak = [r["peak_GiB"] for r in rs if r.get("peak_GiB") is not None]
            cells.append([f"{n}", f"{r0['D']}", f"{r0['V']}{head_name(r0['D'], r0['V'])}",
                          "/".join(str(r["rows_here"]) for r in rs), ms(single), ms(vp), f"{vp / single:.2f}",
                          f"{max(peak):.2f}" if peak else "", f"{r0['ring_bytes_per_rank'] / 2**20:.0f}"])
        out += table(["N", "D", "V", "vocabulary rows per GPU", "1 GPU ms", f"{world} GPUs ms",
                      "time vs 1 GPU", "peak GiB per GPU", "MiB moved per GPU"], cells, text=(2, 3))
    command = meta.get("reproduce") or f"python benchmarks/multi_gpu.py --gpus {world}"
    return out + ["", source([(name, doc)]), "", reproduce([command]), ""]


def _tail_gap(a, b, k=20) -> float:
    """Mean |a - b| over the last k steps: where the curves have settled."""
    return sum(abs(p - q) for p, q in zip(a[-k:], b[-k:])) / len(a[-k:])


def fsdp(name, doc) -> list[str]:
    meta, rows = doc["meta"], doc["rows"]
    s = meta.get("setting", {})
    world = max(r["world"] for r in rows)
    out = [f"### FSDP2 training on {world} x {doc['card']}", "",
           f"A random-init {s.get('model', 'model')} (hidden {s.get('hidden')}, {s.get('layers')} layers, "
           f"V={s.get('vocab')}, {'tied' if s.get('tied_head') else 'untied'} head) patched with "
           f"`{s.get('patch')}` and sharded with FSDP2's `fully_shard` per decoder layer and at the root; "
           f"{s.get('autocast')} autocast, {s.get('optimizer')}, {s.get('steps')} steps of one global "
           f"batch of {s.get('batch')} x {s.get('seq')} tokens split over the GPUs. Does the sharded "
           "run train like the one-GPU run, measured against the difference a second seed makes?", ""]
    out += table(["GPUs", "seed", "first loss", "last loss", "peak MiB (rank 0)"],
                 [[r["world"], r["seed"], f"{r['losses'][0]:.4f}", f"{r['losses'][-1]:.4f}",
                   f"{r['peak_mib_rank0']:.0f}" if r.get("peak_mib_rank0") else ""] for r in rows])
    many = next(r for r in rows if r["world"] == world)
    one = [r for r in rows if r["world"] == 1]
    same = next((r for r in one if r["seed"] == many["seed"]), None)
    others = [r for r in one if r is not same]
    if same is not None:
        gaps = [abs(p - q) for p, q in zip(many["losses"], same["losses"])]
        text = (f"Mean |Δ loss| over the last 20 steps, {world} GPUs against 1 GPU with the same seed: "
                f"{err(_tail_gap(many['losses'], same['losses']))} (at most {err(max(gaps))} over all "
                f"{len(gaps)} steps)")
        if others:
            text += (f"; 1 GPU with seed {others[0]['seed']} against seed {same['seed']}: "
                     f"{err(_tail_gap(others[0]['losses'], same['losses']))}")
        out += ["", text + "."]
        times = [r["ms_per_step"] for r in one if r.get("ms_per_step")]
        if len(times) > 1:
            out += ["", "Step times are left out: at this model size they are warm-up and communication, "
                    f"not the head (the one-GPU runs of one configuration took {ms(min(times))} and "
                    f"{ms(max(times))} ms a step)."]
    command = meta.get("reproduce") or "n/a"
    return out + ["", source([(name, doc)]), "", reproduce([command]), ""]
