"""The maintained benchmarks under benchmarks/: their tiny CPU modes write the shared JSON
envelope, and page.py renders the docs page from a results folder (log-probs and distillation are
checked in tests/test_token_log_probs.py and tests/test_distill.py)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from cutce.bench import report

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(script, *argv, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def test_multi_gpu_cpu_smoke(tmp_path):
    run("multi_gpu.py", "--cpu-smoke", "--out", str(tmp_path))
    doc = report.read_json(tmp_path / "multi_gpu_cpu_x1.json")
    assert doc["benchmark"] == "multi_gpu" and doc["meta"]["world"] == 1 and doc["meta"]["failed"] == 0
    checks = [r for r in doc["rows"] if r["kind"] == "check"]
    timing = [r for r in doc["rows"] if r["kind"] == "timing"]
    assert checks and all(r["ok"] for r in checks)
    assert len(timing) == 1 and timing[0]["vp_ms"] > 0
    out = tmp_path / "benchmarks.md"
    run("page.py", "--results", str(tmp_path), "--out", str(out))
    page = out.read_text()
    assert "## Multi-GPU" in page and "### Vocabulary-parallel loss on 1 x " in page
    assert f"{doc['meta']['checks']} equivalence checks" in page and ": 0 failed." in page
    assert "Reproduce: `python benchmarks/multi_gpu.py --gpus 1`" in page


def test_truncated_cpu_smoke(tmp_path):
    """benchmarks/truncated.py: every cutce row, eager and compiled, errors against float64."""
    proc = run("truncated.py", "--cpu-smoke", "--out", str(tmp_path))
    doc = report.read_json(tmp_path / "truncated_cpu.json")
    assert doc["benchmark"] == "truncated" and doc["meta"]["device"] == "cpu"
    rows = {r["provider"]: r for r in doc["rows"]}
    assert rows["cutce"]["fwd_bwd_ratio"] == 1.0 and len(rows) == 9, list(rows)
    for name in ("cutce top_k=64", "cutce top_p=0.9", "cutce min_p=0.05", "cutce top_k=64+top_p=0.9"):
        r = rows[name]
        assert r["fwd_bwd_ratio"] > 0 and r["note"] == "", r
        assert r["logp_err"] < 1e-5 and r["dE_err"] < 1e-2 and r["dC_err"] < 1e-2, r
    assert "| cutce top_p=0.9 |" in proc.stdout
    assert rows["cutce"]["kept_mean"] is None and 1 <= rows["cutce top_k=64"]["kept_mean"] <= 64
    # the page's section from that file
    out = tmp_path / "benchmarks.md"
    run("page.py", "--results", str(tmp_path), "--out", str(out))
    page = out.read_text()
    assert "## Truncated log-probs (top-k, top-p, min-p)" in page
    assert "### Truncated log-probs on " in page and "Head N=96 tokens, D=32, V=700, bf16" in page
    assert "| cutce |  | " in page and "| cutce top_k=64 | 64.0 | " in page
    assert "Reproduce: `python benchmarks/truncated.py --cpu-smoke`" in page


def test_hf_step_cpu_smoke(tmp_path):
    pytest.importorskip("transformers")
    run("hf_step.py", "--cpu-smoke", "--out", str(tmp_path))
    doc = report.read_json(tmp_path / "hf_step_cpu.json")
    assert doc["benchmark"] == "hf_step"
    rows = {(r["variant"], r["compiled"]): r for r in doc["rows"]}
    assert set(rows) == {(v, c) for v in ("original", "cutce") for c in (False, True)}
    assert all(r["dloss"] < 1e-4 and r["grad_rel_err"] < 1e-4 for r in rows.values())


def _write(path, benchmark, rows, **meta):
    base = dict(date="2026-01-02T03:04:05+00:00", device="cuda", device_name="Test GPU", torch="9.9",
                triton="9.9", cutce="0.0.1", commit="abc1234", cuda="13.0", peers={"trl": "1.0"})
    report.write_json(path, benchmark, dict(base, **meta), rows)


def _loss_row(provider, exact=True, status="ok", **kw):
    row = {k: None for k in report.ROW_FIELDS}
    row.update(shape="tiny", n=64, d=32, v=1000, data="zipf", dtype="bf16", max_prob=0.7, entropy=2.0,
               reference="float32", warmup=1, repeats=3, matmul_dtype="bf16", matmul_ms=1.0,
               provider=provider, exact=exact, status=status, fwd_ms=1.2, fwd_ratio=1.2, fwd_mb=1.0,
               fwdbwd_ms=3.5, fwdbwd_ratio=3.5, peak_mb=10.0, mem_method="cuda-allocator",
               loss_err=1e-5, de_err=2e-3, dc_err=3e-3, error="")
    row.update(kw)
    return row


def test_page_renders_from_a_results_folder(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    _write(results / "bench_cuda_tiny.json", "loss",
           [_loss_row("cutce-triton"), _loss_row("torch", peak_mb=400.0, fwdbwd_ms=5.0),
            _loss_row("apple-cce", exact=False), _loss_row("liger", status="skipped", error="absent")])
    _write(results / "log_probs_cuda.json", "log_probs",
           [dict(section="head", provider="cutce", n=64, d=32, v=1000, dtype="bf16", temperature=0.9,
                 matmul_ms=1.0, fwd_ms=2.0, fwd_ratio=2.0, fwd_bwd_ms=6.0, fwd_bwd_ratio=6.0,
                 peak_mib=5.0, logp_err=1e-4, entropy_err=1e-5, dE_err=4e-3, dC_err=2e-3, note=""),
            dict(section="e2e", provider="cutce token_log_probs", n=60, d=32, v=1000, dtype="bf16",
                 temperature=0.9, fwd_ms=1.0, fwd_bwd_ms=2.0, peak_mib=3.0,
                 note="Qwen2-like 2 layers, batch 2x32, logits_to_keep=None, params 1 MiB")])
    for beta in (0.0, 0.5):
        _write(results / f"distill_cuda_beta{beta:g}.json", "distill",
               [dict(n=64, ds=16, dt=32, v=1000, dtype="bfloat16", temperature=1.0, grads_mib=0.5,
                     warmup=1, repeats=3, beta=beta, provider=p, ms=3.0, peak_mib=2.0, loss_err=1e-6,
                     dE_err=2e-3, dC_err=2e-3, status="ok", note="") for p in ("cutce", "trl")])
    out = tmp_path / "docs" / "benchmarks.md"
    run("page.py", "--results", str(results), "--out", str(out))
    page = out.read_text()
    assert page.startswith("<!-- Generated by benchmarks/page.py")
    assert "| cutce-triton | 1.20x | 3.5 | 3.50x | 10 | 2.0e-03 | 3.0e-03 |" in page
    assert "apple-cce (filtered)" in page and "| liger |" not in page  # skipped rows are left out
    # one source line per table: the two distillation files of one card share theirs
    assert page.count("at commit `abc1234`") == 3 and "Test GPU" in page
    assert "Reproduce: `cutce bench --shape tiny" in page
    assert "| forward KL (beta 0) | cutce |" in page and "| JSD (beta 0.5) | trl |" in page
    assert page.index("forward KL (beta 0)") < page.index("JSD (beta 0.5)")
    assert ("Reproduce: `python benchmarks/distill.py --betas 0`; "
            "`python benchmarks/distill.py --betas 0.5`") in page
    assert "no result file here repeats a measurement yet" in page  # no repeats file: no noise claim
    assert "[Distillation](#distillation)" in page and "Multi-GPU" not in page
    (png,) = (tmp_path / "docs" / "img").glob("*.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and f"](img/{png.name})" in page


def _log_probs_row(n, d, v, provider="cutce", **kw):
    return dict(dict(section="head", provider=provider, n=n, d=d, v=v, dtype="bf16", temperature=1.0,
                     matmul_ms=1.0, fwd_ms=2.0, fwd_ratio=2.0, fwd_bwd_ms=6.0, fwd_bwd_ratio=6.0,
                     peak_mib=5.0, logp_err=1e-4, entropy_err=1e-5, dE_err=4e-3, dC_err=2e-3, note=""), **kw)


def test_page_has_one_table_per_benchmark_and_card(tmp_path):
    results, out = tmp_path / "results", tmp_path / "benchmarks.md"
    h100 = dict(device_name="NVIDIA H100 80GB HBM3")
    _write(results / "log_probs_cuda_h100.json", "log_probs", [_log_probs_row(64, 32, 1000)], **h100)
    _write(results / "log_probs_cuda_h100_small.json", "log_probs", [_log_probs_row(128, 16, 1000)],
           flags={"--shape": "128,16,1000", "--no-e2e": True}, **h100)
    _write(results / "log_probs_cuda.json", "log_probs", [_log_probs_row(64, 32, 1000)])  # another card
    run("page.py", "--results", str(results), "--out", str(out))
    page = out.read_text()
    assert page.count("### Log-probs on H100") == 1 and page.count("### Log-probs on Test GPU") == 1
    # the H100's two heads share one table, a column telling them apart
    assert "| 64x32x1000 | cutce |" in page and "| 128x16x1000 | cutce |" in page
    assert ("Reproduce: `python benchmarks/log_probs.py`; "
            "`python benchmarks/log_probs.py --shape 128,16,1000 --no-e2e`") in page
    # a second run of what a file already holds for that card is an error, not a second table
    _write(results / "log_probs_cuda_h100_again.json", "log_probs", [_log_probs_row(64, 32, 1000)], **h100)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "page.py"), "--results", str(results),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "log_probs_cuda_h100.json and log_probs_cuda_h100_again.json" in proc.stderr


def _fsdp_run(world, seed, losses):
    return dict(world=world, seed=seed, ms_per_step=100.0 + seed, peak_mib_rank0=700.0 / world, losses=losses)


def test_page_shows_fsdp_runs_against_the_seed_noise(tmp_path):
    results, out = tmp_path / "results", tmp_path / "benchmarks.md"
    base = [3.0 - 0.05 * i for i in range(30)]
    _write(results / "fsdp_cuda_x2.json", "fsdp",
           [_fsdp_run(1, 0, base), _fsdp_run(1, 1, [x + 0.01 for x in base]),
            _fsdp_run(2, 0, [x + 0.001 for x in base])],
           world=2, backend="nccl", reproduce="bash fsdp.sh 2",
           setting=dict(model="Llama", hidden=64, layers=2, vocab=1000, tied_head=False, batch=4, seq=32,
                        steps=30, optimizer="AdamW", autocast="bfloat16", patch="cutce.transformers.patch"))
    run("page.py", "--results", str(results), "--out", str(out))
    page = out.read_text()
    assert "## Multi-GPU" in page and "### FSDP2 training on 2 x Test GPU" in page
    assert "2 GPUs against 1 GPU with the same seed: 1.0e-03" in page
    assert "1 GPU with seed 1 against seed 0: 1.0e-02" in page
    assert "Reproduce: `bash fsdp.sh 2`" in page


def test_repeated_runs_make_the_noise_statement(tmp_path):
    runs = tmp_path / "runs"
    for i, (compiled, unit) in enumerate([(10.0, 1.0), (10.5, 1.1), (11.0, 1.0)]):
        _write(runs / f"r{i}" / "bench_cuda_tiny.json", "loss",
               [_loss_row("cutce-triton", fwdbwd_ms=5.0 + 0.1 * (i == 2), matmul_ms=unit),
                _loss_row("torch-compile", fwdbwd_ms=compiled, matmul_ms=unit)],
               date=f"2026-01-02T03:0{i}:00+00:00")
    results = tmp_path / "results"
    run("repeats.py", "--title", "one machine", "--how", "3 runs one after another",
        "--out", str(results / "repeats_cuda_test.json"), *map(str, sorted(runs.glob("r*/*.json"))))
    doc = report.read_json(results / "repeats_cuda_test.json")
    assert doc["benchmark"] == "repeats" and [r["date"][:16] for r in doc["meta"]["runs"]] == [
        "2026-01-02T03:00", "2026-01-02T03:01", "2026-01-02T03:02"]
    assert {(r["provider"], r["run"]) for r in doc["rows"]} == {
        (p, i) for p in ("cutce-triton", "torch-compile", "bf16 matmul") for i in range(3)}
    out = tmp_path / "benchmarks.md"
    run("page.py", "--results", str(results), "--out", str(out))
    page = out.read_text()
    # spreads: torch-compile 1.0/10.5, cutce-triton 0.1/5.0, so the median is 5.8%
    assert "moved by a median of 5.8% and by at most 9.5%" in page
    # the matmul moved by 0.1/1.0, and the ratios with it
    assert ("up to 10.0% (tiny, zipf, bf16 on the Test GPU): torch-compile at tiny, zipf, bf16 on the "
            "Test GPU took 10, 10.5 and 11 ms, read as 10.00x, 9.55x and 11.00x") in page
    assert "### Test GPU: one machine" in page and "3 runs: 3 runs one after another." in page
    assert "| loss | tiny, zipf, bf16 | cutce-triton | cutce at `abc1234` | 3 | 5 | 2.0% | 11.1% |" in page
    # runs of two cards are not repeats of each other
    _write(runs / "r9" / "bench_cuda_tiny.json", "loss", [_loss_row("torch-compile")],
           device_name="NVIDIA H100 80GB HBM3", date="2026-01-03T00:00:00+00:00")
    _write(runs / "r8" / "bench_cuda_tiny.json", "loss", [_loss_row("torch-compile")],
           device_name="NVIDIA H100 80GB HBM3", date="2026-01-03T01:00:00+00:00")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "repeats.py"), "--how", "x", "--out",
                           str(tmp_path / "x.json"), *map(str, sorted(runs.glob("r*/*.json")))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "one card" in proc.stderr


def test_the_committed_page_is_generated_from_the_committed_results(tmp_path):
    # A hand edit of docs/benchmarks.md, or a result file without its page, shows up here.
    pytest.importorskip("matplotlib")
    out = tmp_path / "benchmarks.md"
    run("page.py", "--out", str(out))
    assert out.read_text() == (ROOT / "docs" / "benchmarks.md").read_text()


def test_results_are_in_the_envelope():
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert files
    for path in files:
        doc = json.loads(path.read_text())
        assert doc["benchmark"] in ("loss", "log_probs", "truncated", "distill", "sparse_distill",
                                    "multi_gpu", "hf_step", "trainers", "fsdp", "repeats"), path
        assert {"date", "device", "device_name", "torch", "triton", "cutce", "commit"} <= doc["meta"].keys()
        assert doc["rows"], path


def test_the_committed_page_is_for_users():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    for heading in ("## Multi-GPU", "### Vocabulary-parallel loss on 2 x H200", "### FSDP2 training on 2 x H200",
                    "## Long context", "## Run-to-run spread", "## TRL trainers: one training step"):
        assert heading in page
    # the spread is computed from repeated runs, not stated
    assert "**Run-to-run spread**: the same code on the same card" in page
    # lab notes stay out of the data and the page; one run per table, no re-checks beside it
    data = [p.read_text() for p in (ROOT / "benchmarks" / "results").glob("*.json")]
    for word in ("shimmed", "stubbed"):
        assert not any(word in t for t in [page] + data), word
    assert "recheck" not in page
