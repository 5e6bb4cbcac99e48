"""Time against memory of cutce's strategies (scripts/budget_sweep.py CSV), with the peers of the
same run as points (cutce bench CSVs): docs/bench/budget_frontier.png.

    python scripts/plot_budget.py docs/bench/budget_sweep.csv docs/bench/fused_peers_*.csv
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sweep = list(csv.DictReader(open(sys.argv[1])))
peers = [r for path in sys.argv[2:] for r in csv.DictReader(open(path))]
shapes = list(dict.fromkeys((r["n"], r["d"], r["v"]) for r in sweep))
cols = 3
rows_n = -(-len(shapes) // cols)
fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.6 * rows_n), squeeze=False)
for ax in axes.flat[len(shapes):]:
    ax.axis("off")
for ax, (n, d, v) in zip(axes.flat, shapes):
    rows = [r for r in sweep if (r["n"], r["d"], r["v"]) == (n, d, v)]
    grads = float(rows[0]["grads_mb"])
    pts = sorted((float(r["peak_mb"]) / grads, float(r["ratio"]), float(r["budget"]), r["plan"]) for r in rows)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C0", label="cutce (memory_budget)")
    for x, y, b, plan in pts:
        ax.annotate(f"{b:g}: {plan}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for i, r in enumerate(r for r in peers if (r["n"], r["d"], r["v"]) == (n, d, v)
                          and not r["provider"].startswith("cutce") and r["status"] == "ok"):
        ax.plot(float(r["peak_mb"]) / grads, float(r["fwdbwd_ratio"]), "s", color=f"C{i + 1}",
                label=r["provider"])
    ax.set_title(f"N={n} D={d} V={v}", fontsize=9)
    ax.set_xlabel("peak memory / gradients' size")
    ax.set_ylabel("fwd+bwd time / one matmul")
    ax.set_xlim(left=0.8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
fig.suptitle("H200, bf16, zipf data: time against memory (lower left is better)", fontsize=10)
fig.tight_layout()
fig.savefig("docs/bench/budget_frontier.png", dpi=110)
print("wrote docs/bench/budget_frontier.png")
