"""The benchmark page's run-to-run spread, from the repeats files that benchmarks/repeats.py
writes: the same code on the same card, measured in separate runs."""

from __future__ import annotations

import statistics

from page_format import ms, pct, reproduce, table

UNIT = "bf16 matmul"  # the row repeats.py gives the unit that ratios divide by


def groups(doc) -> list[dict]:
    """One entry per thing measured more than once: its runs' times, spread and ratios."""
    found = {}
    for r in doc["rows"]:
        found.setdefault((r["benchmark"], r["key"], r["provider"], r["code"]), []).append(r)
    out = []
    for (bench, key, provider, code), rows in found.items():
        times = [r["ms"] for r in rows]
        mid = statistics.median(times)
        g = dict(benchmark=bench, key=key, provider=provider, code=code, card=doc["card"],
                 runs=sorted({r["run"] for r in rows}), times=times, median=mid,
                 spread=(max(times) - min(times)) / mid, ratios=None, ratio_spread=None)
        if provider != UNIT and all(r.get("unit_ms") for r in rows):
            g["ratios"] = [r["ms"] / r["unit_ms"] for r in rows]
            g["ratio_spread"] = (max(g["ratios"]) - min(g["ratios"])) / statistics.median(g["ratios"])
        out.append(g)
    return out


def _code(g, runs, common) -> str:
    """cutce's rows name the commits they ran at (their source trees match); peers' the versions
    that are not the same in every run of the file."""
    if g["provider"].startswith("cutce"):
        return "cutce at " + ", ".join(dict.fromkeys(f"`{runs[i]['commit']}`" for i in g["runs"]))
    rest = g["code"].split("; ")[-1].removeprefix(common).lstrip(", ")
    return rest or "torch"


def _common(runs) -> str:
    """The torch and Triton versions when every run had the same, else ""."""
    kinds = {(r.get("torch"), r.get("triton")) for r in runs}
    return f"torch {runs[0].get('torch')}, triton {runs[0].get('triton')}" if len(kinds) == 1 else ""


def _and(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def summary(docs) -> str:
    """The "How it is measured" bullet, from every repeats file; honest when there are none."""
    found = [g for _, doc in docs for g in groups(doc)]
    timed = [g for g in found if g["provider"] != UNIT]
    if not timed:
        return ("**Run-to-run spread**: no result file here repeats a measurement yet, so the page "
                "cannot say how far a second run would move a number; treat differences of a few "
                "percent as unverified.")
    worst = max(timed, key=lambda g: g["spread"])
    cards = []
    for c in dict.fromkeys(g["card"] for g in timed):
        counts = sorted({len(g["times"]) for g in timed if g["card"] == c})
        each = f"{counts[0]} runs" if len(counts) == 1 else f"{counts[0]} to {counts[-1]} runs"
        cards.append(f"{sum(g['card'] == c for g in timed)} repeated rows on the {c}, {each} each")
    text = (f"**Run-to-run spread**: the same code on the same card, measured again in a separate run, "
            f"moved by a median of {pct(statistics.median(g['spread'] for g in timed))} and by at most "
            f"{pct(worst['spread'])} (the spread of a row: its largest minus its "
            f"smallest time over their median; {'; '.join(cards)}; the largest: {worst['provider']} at "
            f"{worst['key']} on the {worst['card']}).")
    if not any(g["provider"].startswith("cutce") for g in timed):
        text += " These rows are all peers': cutce's own code changed between the runs."
    text += " Differences smaller than that between two tables are noise."
    units = [g for g in found if g["provider"] == UNIT]
    ratio = [g for g in timed if g["ratio_spread"] is not None]
    if units and ratio:
        u = max(units, key=lambda g: g["spread"])
        there = [g for g in ratio if (g["card"], g["benchmark"], g["key"]) == (u["card"], u["benchmark"], u["key"])]
        r = max(there or ratio, key=lambda g: g["ratio_spread"])
        text += (f" A ratio also carries the spread of the bf16 matmul it divides by, up to {pct(u['spread'])} "
                 f"({u['key']} on the {u['card']}): {r['provider']} at {r['key']} on the {r['card']} took "
                 + _and(ms(t) for t in r["times"]) + " ms, read as " + _and(f"{x:.2f}x" for x in r["ratios"])
                 + ". Compare times, not ratios, across tables.")
    return text + " [Run-to-run spread](#run-to-run-spread) lists every repeated measurement."


def section(docs) -> list[str]:
    out = ["Every measurement taken more than once of the same code on the same card: the runs' "
           "median time and its spread, the largest minus the smallest time over the median (for "
           f"a time with a ratio, the ratio's spread too). The `{UNIT}` rows are the unit the "
           "ratios divide by.", ""]
    for name, doc in docs:
        meta, found = doc["meta"], groups(doc)
        runs = meta.get("runs") or []
        common = _common(runs)
        dates = sorted(str(r.get("date"))[:10] for r in runs)
        commits = ", ".join(dict.fromkeys(f"`{r.get('commit')}`" for r in runs))
        out += [f"### {doc['card']}: {meta.get('title', 'repeated runs')}", "",
                f"{len(runs)} runs: {meta.get('how')}.", ""]
        cells = [[g["benchmark"], g["key"], g["provider"], _code(g, runs, common), len(g["times"]),
                  ms(g["median"]), pct(g["spread"]), "" if g["ratio_spread"] is None else pct(g["ratio_spread"])]
                 for g in sorted(found, key=lambda g: (g["benchmark"], g["key"], g["provider"]))]
        out += table(["benchmark", "shape", "provider", "code", "runs", "median ms", "spread",
                      "ratio spread"], cells, text=(0, 1, 2, 3))
        when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
        versions = f"{common} in every run; " if common else ""
        out += ["", f"*{meta.get('device_name')}; {versions}runs of {when} at commits {commits}; "
                f"file `benchmarks/results/{name}`.*", ""]
        if meta.get("reproduce"):
            out += [reproduce([meta["reproduce"]]), ""]
    return out
