"""Collect measurements of the same code taken in separate runs: the page's run-to-run spread.

    python benchmarks/repeats.py --history
        # every run in benchmarks/results, now or in git's history -> results/repeats_history_<card>.json
    python benchmarks/repeats.py --title "one machine" --how "5 runs one after another on one H100" \\
        --out benchmarks/results/repeats_cuda_h100.json bench-out/r*/*.json
        # the result files of repeated runs on one card -> one file

Two measurements are repeats when the card, the benchmark and its shape, the provider and the code
under test match: cutce's source tree (src/cutce at the run's commit) for cutce's rows, the
versions of torch, Triton and the peer's package for the others. A run's number found in several
versions of a file counts once; what was measured only once is left out.

The file is a result envelope, {"benchmark": "repeats", "meta", "rows"}. meta: the newest run's,
plus "title" (words for a heading), "how" (what the runs were), "reproduce", and "runs" (each
run's date, commit, device_name, torch, triton, cuda, peers, files). rows: {"benchmark", "key"
(the shape), "provider", "code", "run" (an index into runs), "ms" (forward+backward or step
time), "unit_ms" (the run's bf16 matmul of the shape, what ratios divide by, or null)}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from cutce.bench import report  # noqa: E402
from page_format import card  # noqa: E402

UNIT = "bf16 matmul"


def _git(*args) -> str:
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout


def timed_rows(doc):
    """(key, provider, ms, unit_ms, peer packages) of each timed row of a result file."""
    b = doc["benchmark"]
    for r in doc["rows"]:
        if r.get("status", "ok") != "ok":
            continue
        unit, pkgs = None, ()
        if b == "loss":
            key, ms, unit = f"{r['shape']}, {r['data']}, {r['dtype']}", r.get("fwdbwd_ms"), r.get("matmul_ms")
        elif b == "log_probs" and r["section"] == "head":
            key, ms, unit = f"{r['n']}x{r['d']}x{r['v']}, T={r['temperature']:g}", r.get("fwd_bwd_ms"), r.get("matmul_ms")
        elif b == "log_probs":
            key, ms, pkgs = f"end to end, {r['n']} tokens", r.get("fwd_bwd_ms"), ("transformers",)
        elif b == "distill":
            key, ms = f"beta {r['beta']:g}, {r['n']}x{r['ds']}/{r['dt']}x{r['v']}", r.get("ms")
        elif b == "trainers":
            key, ms, pkgs = f"{r['trainer']}, {r['model']}", r.get("ms"), ("trl", "transformers")
        else:
            return
        provider = r.get("provider") or r.get("mode")
        if provider.startswith("trl"):
            pkgs = ("trl", "transformers")
        elif provider.startswith("liger"):
            pkgs = ("liger-kernel",)
        elif provider.startswith("apple-cce"):
            pkgs = ("cut-cross-entropy",)
        if ms is not None:
            yield key, provider, ms, unit, pkgs
        if unit is not None:
            yield key, UNIT, unit, unit, ()


_TREES = {}


def cutce_code(meta, history) -> str:
    """What cutce's rows ran: the src/cutce tree at the commit, so that commits that changed
    nothing there count as the same code. In the history a run with uncommitted changes matches
    no other; runs handed in as repeats are taken at their word."""
    commit = str(meta.get("commit"))
    if history and "+" in commit:
        return f"commit {commit} of {meta.get('date')}"
    if commit not in _TREES:
        tree = _git("rev-parse", "--verify", "-q", f"{commit.split('+')[0]}:src/cutce").strip()
        _TREES[commit] = f"src/cutce {tree[:10]}" if tree and "+" not in commit else f"commit {commit}"
    return _TREES[commit]


def collect(docs, title, how, reproduce, history=False) -> dict:
    """card -> repeats envelope, from (file name, document) pairs of any runs."""
    runs, seen = {}, {}
    for name, doc in docs:
        m = doc["meta"]
        if doc["benchmark"] == "repeats":
            continue
        run = (m.get("date"), str(m.get("commit")), m.get("device_name"))
        runs.setdefault(run, (m, []))[1].append(name)
        for key, provider, ms, unit, pkgs in timed_rows(doc):
            peers = m.get("peers") or {}
            code = f"torch {m.get('torch')}, triton {m.get('triton')}" + "".join(
                f", {p} {peers.get(p, 'n/a')}" for p in pkgs)
            if provider.startswith("cutce"):
                code = f"{cutce_code(m, history)}; {code}"
            seen.setdefault((card(m), doc["benchmark"], key, provider, code, run), (ms, unit))
    groups = {}
    for (c, bench, key, provider, code, run), value in seen.items():
        groups.setdefault((c, bench, key, provider, code), []).append((run, value))
    by_card = {}
    for (c, bench, key, provider, code), measured in groups.items():
        if len(measured) > 1:
            by_card.setdefault(c, []).extend((bench, key, provider, code, run, ms, unit)
                                             for run, (ms, unit) in measured)
    envelopes = {}
    for c, items in by_card.items():
        ordered = sorted({it[4] for it in items}, key=lambda run: str(run[0]))  # oldest first
        index = {run: i for i, run in enumerate(ordered)}
        rows = sorted((dict(benchmark=b, key=k, provider=p, code=code, run=index[run], ms=ms, unit_ms=u)
                       for b, k, p, code, run, ms, u in items),
                      key=lambda r: (r["benchmark"], r["key"], r["provider"], r["code"], r["run"]))
        metas = [runs[run][0] for run in ordered]
        keep = ("date", "commit", "device_name", "torch", "triton", "cuda", "peers")
        meta = dict({k: metas[-1].get(k) for k in ("date", "device", "device_name", "torch", "triton",
                                                   "cutce", "commit", "cuda", "peers")},
                    title=title, how=how, reproduce=reproduce,
                    runs=[dict({k: m.get(k) for k in keep}, files=sorted(set(runs[run][1])))
                          for run, m in zip(ordered, metas)])
        envelopes[c] = report.envelope("repeats", meta, rows)
    return envelopes


def committed():
    """(file name, document) of every result file in benchmarks/results and of every version of
    one in git's history: a run about to be published counts with those before it."""
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))):
        yield os.path.basename(path), report.read_json(path)
    blobs = set()
    for commit in _git("log", "--format=%H", "--", "benchmarks/results").split():
        for line in _git("ls-tree", commit, "benchmarks/results/").splitlines():
            _, kind, blob, path = line.split(None, 3)
            if kind != "blob" or not path.endswith(".json") or blob in blobs:
                continue
            blobs.add(blob)
            yield os.path.basename(path), json.loads(_git("cat-file", "blob", blob))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="result files of repeated runs, one card")
    ap.add_argument("--history", action="store_true",
                    help="every run in benchmarks/results, now or in git's history")
    ap.add_argument("--title", default="repeated runs", help="the page's heading for them, after the card")
    ap.add_argument("--how", help="what the runs were, for the page (required with files)")
    ap.add_argument("--reproduce", default=None, help="the commands that made the runs, for the page")
    ap.add_argument("--out", help="output file (with files; --history writes one file per card)")
    args = ap.parse_args(argv)
    if args.history == bool(args.files) or (args.files and not (args.how and args.out)):
        ap.error("give --history, or result files with --how and --out")
    if args.history:
        how = ("separate runs published in this repository, at other commits, minutes to hours apart, "
               "each on whichever machine of the card it was given")
        found = collect(committed(), "published runs", how,
                        args.reproduce or "python benchmarks/repeats.py --history", history=True)
        for c, env in found.items():
            name = f"repeats_history_{env['meta']['device']}_{c.lower()}.json"
            path = os.path.join(ROOT, "benchmarks", "results", name)
            report.write_json(path, "repeats", env["meta"], env["rows"])
            print(f"wrote {path} ({len(env['rows'])} measurements, {len(env['meta']['runs'])} runs)")
        return 0
    found = collect(((os.path.basename(p), report.read_json(p)) for p in args.files), args.title, args.how,
                    args.reproduce)
    if len(found) != 1:
        sys.exit(f"expected repeated measurements on one card, found {sorted(found) or 'none'}")
    (env,) = found.values()
    print(f"wrote {report.write_json(args.out, 'repeats', env['meta'], env['rows'])} "
          f"({len(env['rows'])} measurements, {len(env['meta']['runs'])} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
