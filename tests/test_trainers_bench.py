"""benchmarks/trainers.py: its tiny CPU mode runs a real TRL trainer with each of the three heads,
agrees with itself across them, and the docs page renders its result file."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

from cutce.bench import report

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _trl_with_the_hook():
    if not all(importlib.util.find_spec(m) for m in ("trl", "transformers", "datasets", "tokenizers")):
        return False
    version = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("trl"))
    return version is not None and (int(version[1]), int(version[2])) >= (1, 15)


def run(script, *argv):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.skipif(not _trl_with_the_hook(), reason="needs TRL >= 1.15 (add_fused_lm_head), "
                    "transformers, datasets and tokenizers")
def test_trainers_cpu_smoke_dpo(tmp_path):
    # DPO asks the head for the most outputs (entropy, mean_logits, is_top1) and has a reference model.
    results = tmp_path / "results"
    run("trainers.py", "--cpu-smoke", "--trainers", "dpo", "--models", "qwen2.5-0.5b", "--out", str(results))
    doc = report.read_json(results / "trainers_cpu_qwen2.5-0.5b_dpo.json")
    assert doc["benchmark"] == "trainers" and doc["meta"]["setting"]["dtype"] == "float32"
    rows = {r["mode"]: r for r in doc["rows"]}
    assert list(rows) == ["trl-fused", "trl-plain", "cutce", "cutce-auto"]
    for r in rows.values():
        assert r["status"] == "ok" and r["trainer"] == "dpo" and r["grad_ckpt"] is True
        assert r["tokens"] == 2 * 2 * 32 and 0 < r["scored"] < r["tokens"] and r["ms"] > 0
        assert r["logp_err"] < 1e-5  # float32 on CPU: every head is the float32 reference
        assert abs(r["loss"] - rows["trl-fused"]["loss"]) < 1e-5

    out = tmp_path / "docs" / "benchmarks.md"
    run("page.py", "--results", str(results), "--out", str(out))
    page = out.read_text()
    assert "## TRL trainers: one training step" in page
    assert "| dpo | qwen2.5-0.5b | trl-fused | 128 |" in page and "| 1.00x |" in page
    assert "Reproduce: `python benchmarks/trainers.py --models qwen2.5-0.5b --trainers dpo`" in page
