"""Run metadata, the JSON result file (write and read back), and the printed table.

One file per run, shared by ``cutce bench`` and the entry points under ``benchmarks/``::

    {"benchmark": "loss", "meta": {date, device, device_name, torch, ...}, "rows": [{...}, ...]}

The meta (device, versions, date, commit) is what makes a number comparable to another; plots and
the generated docs page are made from the file alone, so a run from any machine can be re-plotted.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess

import torch

import cutce

# The fields of one loss row, in the order the table and the plots read them; the run's
# metadata sits once in the envelope, not in every row.
ROW_FIELDS = [
    "shape", "n", "d", "v", "data", "dtype", "max_prob", "entropy", "reference",
    "warmup", "repeats", "matmul_dtype", "matmul_ms",
    "provider", "exact", "status",
    "fwd_ms", "fwd_ratio", "fwd_mb", "fwdbwd_ms", "fwdbwd_ratio", "peak_mb", "mem_method",
    "loss_err", "de_err", "dc_err", "error",
]
NA = "n/a"
# mem_method column -> what the MB columns mean
MEM_METHODS = {
    "cuda-allocator": "MiB allocated above the inputs (CUDA allocator peak)",
    "rss-subprocess": "MiB of peak RSS growth above the inputs, each provider in its own process",
    "none": "n/a (not measured: on CPU only with one process per provider, on Linux)",
}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return NA


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    """Short commit of the cutce checkout (``+dirty`` with local changes), so that numbers of
    successive kernel versions can be told apart; n/a outside a git checkout."""
    here = os.path.dirname(os.path.abspath(cutce.__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return NA
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return NA


# Packages whose versions decide a peer's row (transformers and trl: the log-probs, distillation and
# training-step benchmarks compare against them).
PEERS = ("cut-cross-entropy", "liger-kernel", "transformers", "trl")


def run_metadata(device) -> dict:
    """Device, versions and date: the columns that make a number comparable to another."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    peers = {d: _version(d) for d in PEERS if _version(d) != NA}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cutce": cutce.__version__,
        "commit": _git_commit(),
        "cuda": torch.version.cuda or NA,
        "peers": peers,
    }


def _clean(value):
    # NaN is not JSON: a missing number is null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def envelope(benchmark: str, meta: dict, rows) -> dict:
    return {"benchmark": benchmark, "meta": _clean(dict(meta)), "rows": [_clean(dict(r)) for r in rows]}


def write_json(path, benchmark: str, meta: dict, rows) -> str:
    """Write one run's results in the shared envelope; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(envelope(benchmark, meta, rows), f, indent=1)
        f.write("\n")
    return str(path)


def read_json(path) -> dict:
    """A result file: ``{"benchmark", "meta", "rows"}``; raises ValueError when it is not one."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not {"benchmark", "meta", "rows"} <= doc.keys():
        raise ValueError(f"{path}: expected a benchmark result (benchmark, meta, rows), got {type(doc).__name__}")
    return doc


def format_peers(peers) -> str:
    if isinstance(peers, dict):
        return " ".join(f"{k}={v}" for k, v in peers.items()) or "none"
    return str(peers or "none")


def fmt_ms(x) -> str:
    """Milliseconds with 3 significant digits, whole numbers from 100 on (no 1.27e+03)."""
    return NA if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


_ms = fmt_ms


def progress_row(key, row, grads_mb) -> str:
    """One markdown row a benchmark prints as each measurement lands: ``key`` (the row's own
    first column), provider, ms, peak MiB and its multiple of the gradients' size, the loss / dE /
    dC errors, and the note (with the status when it is not "ok")."""
    def f(x, spec):
        return "" if x is None else format(x, spec)
    ratio = f"{row['peak_mib'] / grads_mb:.2f}x" if row["peak_mib"] else ""
    note = row["note"] if row["status"] == "ok" else f"{row['status']}: {row['note']}"
    errs = " | ".join(f(row[k], ".1e") for k in ("loss_err", "dE_err", "dC_err"))
    return (f"| {key} | {row['provider']} | {f(row['ms'], '.2f')} | {f(row['peak_mib'], '.0f')} "
            f"| {ratio} | {errs} | {note} |")


def gradients_mb(n, d, v, dtype_name) -> float:
    """MiB of dE and dC in the run's dtype: the least that forward+backward must allocate."""
    itemsize = 4 if dtype_name == "fp32" else 2
    return (n + v) * d * itemsize / 2**20


def _ratio(x):
    return NA if x is None else f"{x:.2f}x"


def _mb(x):
    return NA if x is None else f"{x:.1f}"


def _err(x):
    return NA if x is None or math.isnan(x) else f"{x:.2e}"


TABLE_HEADER = ["provider", "fwd ms", "fwd ratio", "fwd+bwd ms", "ratio", "fwd MB", "peak MB",
                "loss err", "dE err", "dC err"]


def table_lines(rows) -> list[str]:
    """A Markdown table of measured rows, followed by
    one line per error. Ratios are to the matmul of the same run; MB are MiB above the inputs."""
    cells = [TABLE_HEADER]
    notes = []
    for r in rows:
        if r["status"] == "skipped":
            continue
        cells.append([r["provider"], _ms(r["fwd_ms"]), _ratio(r["fwd_ratio"]), _ms(r["fwdbwd_ms"]),
                      _ratio(r["fwdbwd_ratio"]), _mb(r["fwd_mb"]), _mb(r["peak_mb"]),
                      _err(r["loss_err"]), _err(r["de_err"]), _err(r["dc_err"])])
        if r.get("error"):
            notes.append(f"  {r['provider']}: {r['error']}")
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEADER))]

    def line(c):
        return "| " + " | ".join(x.ljust(w) if i == 0 else x.rjust(w)
                                 for i, (x, w) in enumerate(zip(c, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    return [line(cells[0]), sep] + [line(c) for c in cells[1:]] + notes
