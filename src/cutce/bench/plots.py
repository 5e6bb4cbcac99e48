"""PNG plots made from a bench result file (never from in-memory results, so that a JSON from any
machine can be re-plotted with ``cutce bench --plot-only FILE.json``).

One N in the file: bars per provider of forward and forward+backward time as a ratio to the
matmul, and of peak memory (when measured), with reference lines: 1 matmul for the forward, 3 for
forward+backward (logits, dE, dC), and the memory of dE + dC. Several N (``--sweep-n``): time and memory against N, log-log.
matplotlib is imported here only, and only through its object API (no pyplot, no global backend
state), so the package and the bench run without it until a plot is asked for.
"""

from __future__ import annotations

import os
from collections import defaultdict

from .providers import PROVIDERS
from .report import fmt_ms, gradients_mb, read_json

_ORDER = list(PROVIDERS)


_COLORS = {
    "cutce-torch": "#1f77b4", "cutce-triton": "#2ca02c", "cutce-triton-recompute": "#98df8a",
    "cutce-triton-filtered": "#d62728", "torch": "#ff7f0e", "torch-compile": "#9467bd",
    "torch-native": "#ffbb78", "torch-native-chunked": "#e377c2", "apple-cce": "#c5b0d5",
    "apple-cce-exact": "#8c564b", "liger": "#17becf",
}


def provider_color(name):
    # A provider keeps its colour across every plot and run.
    return _COLORS.get(name, ("#7f7f7f", "#bcbd22", "#aec7e8")[len(name) % 3])


def _ms(x):
    return f"{fmt_ms(x)} ms"


def _sort_key(row):
    name = row["provider"]
    return (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)


def _title(row, with_n=True):
    n = f"N={row['n']} " if with_n else ""
    # A custom shape's name is just its numbers; a named one (gemma2-2b) says which model.
    name = "" if "," in row["shape"] else f" ({row['shape']})"
    commit = f" ({row['commit']})" if row.get("commit") not in (None, "", "n/a") else ""
    return (f"{row['device_name']} | {n}D={row['d']} V={row['v']}{name} | "
            f"{row['data']} data | {row['dtype']} | torch {row['torch']}, cutce {row['cutce']}{commit} | {row['date'][:10]}")


def _bar_panel(ax, rows, key, label, line=None, fmt=None):
    rows = sorted(rows, key=_sort_key)
    names = [r["provider"] + ("" if r[key] is not None else "  (error)" if r["status"] == "error"
                              else "  (n/a)") for r in rows]
    values = [r[key] or 0.0 for r in rows]
    ys = range(len(rows))
    bars = ax.barh(ys, values, color=[provider_color(r["provider"]) for r in rows],
                   hatch=None, edgecolor="black", linewidth=0.5)
    for bar, r in zip(bars, rows):
        if r.get("exact") is False:
            bar.set_hatch("//")  # filtered gradients: approximate, not comparable one-for-one
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    if line is not None:
        ax.axvline(line, **_LINE)
    top = max(values + ([line] if line else []), default=0.0) or 1.0
    for y, r, v in zip(ys, rows, values):
        if r[key] is not None and fmt is not None:
            ax.text(v + top * 0.01, y, fmt(r), va="center", fontsize=8)
    ax.set_xlim(0, top * 1.35)
    ax.grid(axis="x", alpha=0.3)


_LINE = dict(color="gray", linestyle="--", linewidth=1)


def _mem_label(rows):
    method = rows[0].get("mem_method")
    if method == "rss-subprocess":
        return "peak extra memory, fwd+bwd (MiB, gradients included)\nRSS growth above the inputs, one process per provider"
    return "peak extra memory, fwd+bwd (MiB, gradients included)\nallocated above the inputs (CUDA allocator)"


def _plot_bars(rows, path):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    has_mem = any(r["peak_mb"] is not None for r in rows)
    panels = 3 if has_mem else 2
    height = 2.0 + 0.45 * len(rows)
    fig = Figure(figsize=(5.2 * panels, height), layout="constrained")
    axes = fig.subplots(1, panels, sharey=True)
    mm = f"{rows[0]['matmul_dtype']} matmul ({_ms(rows[0]['matmul_ms'])})"
    _bar_panel(axes[0], rows, "fwd_ratio", f"forward time / {mm}", line=1,
               fmt=lambda r: f"{r['fwd_ratio']:.2f}x  {_ms(r['fwd_ms'])}")
    _bar_panel(axes[1], rows, "fwdbwd_ratio", f"forward+backward time / {mm}", line=3,
               fmt=lambda r: f"{r['fwdbwd_ratio']:.2f}x  {_ms(r['fwdbwd_ms'])}")
    line_label = "time of 1 matmul (forward) and of 3 (forward+backward: logits, dE, dC)"
    if has_mem:
        r0 = rows[0]
        grads = gradients_mb(r0["n"], r0["d"], r0["v"], r0["dtype"])
        _bar_panel(axes[2], rows, "peak_mb", _mem_label(rows), line=grads,
                   fmt=lambda r: f"{r['peak_mb']:.0f} MiB")
        line_label += f"; memory of dE + dC alone ({grads:.0f} MiB)"
    handles = [Line2D([], [], **_LINE, label=line_label)]
    if any(r.get("exact") is False for r in rows):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="filtered (approximate) gradients"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(_title(rows[0]) + ("" if has_mem else " | memory: not measured"), fontsize=9)
    fig.savefig(path, dpi=110)


def _plot_sweep(rows, path):
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    by_provider = defaultdict(list)
    matmul = {}
    for r in rows:
        by_provider[r["provider"]].append(r)
        matmul[r["n"]] = r["matmul_ms"]
    has_mem = any(r["peak_mb"] is not None for r in rows)
    panels = [("fwd_ms", "forward time (ms)"), ("fwdbwd_ms", "forward+backward time (ms)")]
    if has_mem:
        panels.append(("peak_mb", "peak extra memory, fwd+bwd (MiB"
                       + (", RSS growth)" if rows[0].get("mem_method") == "rss-subprocess" else ")")))
    ns = sorted(matmul)
    fig = Figure(figsize=(5.2 * len(panels), 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (key, label) in zip(axes, panels):
        for name in sorted(by_provider, key=lambda p: _sort_key({"provider": p})):
            pts = sorted((r["n"], r[key]) for r in by_provider[name] if r[key] is not None)
            if pts:
                exact = by_provider[name][0].get("exact") is not False
                ax.plot(*zip(*pts), marker="o", markersize=3, color=provider_color(name),
                        linestyle="-" if exact else ":", label=name)
        if key == "peak_mb":
            r0 = rows[0]
            (grads,) = ax.plot(ns, [gradients_mb(n, r0["d"], r0["v"], r0["dtype"]) for n in ns],
                               color="gray", linestyle="--", linewidth=1, label="dE+dC alone")
            ax.legend(handles=[grads], fontsize=8)
        else:
            ax.plot(ns, [matmul[n] for n in ns], color="black", linestyle="--", linewidth=1,
                    label=f"{rows[0]['matmul_dtype']} matmul")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in ns])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured N are labelled
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    notes = []
    if any(r.get("exact") is False for r in rows):
        notes.append("dotted: filtered (approximate) gradients")
    if any(r["status"] == "error" for r in rows):
        notes.append("missing points: error (e.g. out of memory)")
    fig.suptitle(_title(rows[0], with_n=False) + ("" if has_mem else " | memory: not measured")
                 + ("\n" + "; ".join(notes) if notes else ""), fontsize=9)
    fig.savefig(path, dpi=110)


def plot_json(json_path, png_path=None) -> str:
    """Write the PNG for a ``cutce bench`` result file (default: next to it, same name) and return
    its path."""
    doc = read_json(json_path)
    if doc["benchmark"] != "loss":
        raise ValueError(f"{json_path}: expected a 'loss' benchmark (cutce bench), got {doc['benchmark']!r}")
    # Titles read the run's metadata as if it were part of each row.
    rows = [dict(doc["meta"], **r) for r in doc["rows"] if r["status"] != "skipped"]
    if not rows:
        raise ValueError(f"{json_path}: no measured rows to plot")
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    if len({r["n"] for r in rows}) > 1:
        _plot_sweep(rows, png_path)
    else:
        _plot_bars(rows, png_path)
    return png_path
