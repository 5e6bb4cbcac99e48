"""Cells, tables and the provenance lines of the benchmark page (benchmarks/page.py)."""

from __future__ import annotations

import re

# Model heads the benchmarks use, by (D, V): a table names the model a shape comes from.
HEADS = {(2304, 256000): "Gemma 2 2B", (4096, 128256): "Llama 3 8B", (2560, 262144): "Gemma 3 4B",
         (3584, 152064): "Qwen2.5-7B", (896, 151936): "Qwen2.5-0.5B"}


def ms(x):
    return "" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def ratio(x):
    return "" if x is None else f"{x:.2f}x"


def mib(x):
    return "" if x is None else f"{x:.0f}"


def err(x):
    return "" if x is None else f"{x:.1e}"


def pct(x):
    return f"{100 * x:.1f}%"


def brief(error: str) -> str:
    """An error cell's gist: an out-of-memory row says how much it asked for, once (the
    allocator's message repeats per pass and runs to several lines)."""
    m = re.search(r"OutOfMemoryError: CUDA out of memory\. Tried to allocate ([\d.]+ [GM]iB)", error)
    return f"out of memory (tried to allocate {m.group(1)})" if m else error


def head_name(d, v) -> str:
    name = HEADS.get((d, v))
    return f" ({name} head)" if name else ""


def table(header, rows, text=(0,)) -> list[str]:
    """A Markdown table; the columns at the indices in `text` are left-aligned, the numbers right."""
    align = ["---" if i in text or i - len(header) in text else "---:" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def drop_empty(header, cells, keep=(0,)):
    """The table without the columns that no row fills (a provider set that measured no ratio,
    a run without notes)."""
    used = [i for i in range(len(header)) if i in keep or any(str(c[i]) for c in cells)]
    return [header[i] for i in used], [[c[i] for i in used] for c in cells]


def card(meta) -> str:
    """The GPU's short name for headings ("H100" from "NVIDIA H100 80GB HBM3"): runs of one
    shape on two cards differ by more than runs on one card, so every table names its card."""
    name = meta.get("device_name") or meta.get("device") or "n/a"
    return next((w for w in name.split() if w[:1] in "ABHL" and w[1:4].isdigit()), name)


def _peers(meta) -> str:
    peers = meta.get("peers") or {}
    return ", ".join(f"{k} {v}" for k, v in peers.items()) if isinstance(peers, dict) else str(peers)


def _versions(meta) -> str:
    if meta.get("torch") is None:
        return "versions not recorded"
    cuda = f", CUDA {meta['cuda']}" if meta.get("cuda") not in (None, "n/a") else ""
    peers = _peers(meta)
    return (f"torch {meta['torch']}, triton {meta.get('triton')}{cuda}"
            + (f"; peers: {peers}" if peers else ""))


def source(docs) -> str:
    """The line under every table: where its numbers come from. `docs`: (file name, document)
    pairs; files of one run setting (card, versions, commit, day) share a clause."""
    groups = {}
    for name, doc in docs:
        m = doc["meta"]
        what = (f"{m.get('device_name', m.get('device'))}; {_versions(m)}; cutce {m.get('cutce')} at "
                f"commit `{m.get('commit')}`; {str(m.get('date', ''))[:10]}")
        groups.setdefault(what, []).append(f"`benchmarks/results/{name}`")
    return "*" + " ".join(f"{what}; {'files' if len(f) > 1 else 'file'} {', '.join(f)}."
                          for what, f in groups.items()) + "*"


def reproduce(commands) -> str:
    commands = list(dict.fromkeys(commands))
    return "Reproduce: " + "; ".join(f"`{c}`" for c in commands)
