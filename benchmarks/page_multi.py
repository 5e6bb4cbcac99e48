"""The multi-GPU section of the benchmark page: the vocabulary-parallel loss. Each table comes from
one result file, (file name, document)."""

from __future__ import annotations

import statistics

from page_format import head_name, ms, reproduce, source, table

MULTI_GPU = """\
Several GPUs of one host over NCCL, with NVLink multicast off.
"""


def section(vocab_parallel_files) -> list[str]:
    return [MULTI_GPU] + [line for nd in vocab_parallel_files for line in vocab_parallel(*nd)]


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
