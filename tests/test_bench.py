"""Smoke tests of `cutce bench` at tiny shapes: the run, the JSON, the PNG, error rows, the CLI.

Timings are never asserted (they decide nothing here); only that the numbers exist, the errors
against the float64 reference are at float32 rounding, and the files are well formed.
"""

from __future__ import annotations

import math

import pytest
import torch

from cutce.bench import data, measure, providers, report
from cutce import cli
from cutce.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--device", "cpu", "--shape", "48,32,300", "--repeats", "1", "--warmup", "1"]


def _result(out_dir):
    files = sorted(out_dir.glob("*.json"))
    assert len(files) == 1, files
    doc = report.read_json(files[0])
    assert doc["benchmark"] == "loss"
    return files[0], doc["meta"], {r["provider"]: r for r in doc["rows"]}


HAS_NATIVE = hasattr(torch.nn.functional, "linear_cross_entropy")


def test_bench_writes_table_json_and_png(tmp_path, capsys):
    # Logits of 8 MiB: big enough for their memory to show in the RSS of each provider's process.
    n, d, v = 256, 32, 8192
    args = ["bench", "--device", "cpu", "--shape", f"{n},{d},{v}", "--repeats", "1", "--warmup", "1"]
    assert main([*args, "--data", "flat", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| provider" in printed and "cutce-torch" in printed
    path, meta, rows = _result(tmp_path)
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__ and meta["date"]
    assert isinstance(meta["peers"], dict)
    rss = measure.RssPeak.available()
    native = ("torch-native", "torch-native-chunked") if HAS_NATIVE else ()
    for name in ("cutce-torch", "torch", *native):
        r = rows[name]
        assert r["status"] == "ok", r["error"]
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
        assert math.isclose(r["fwd_ratio"], r["fwd_ms"] / r["matmul_ms"], rel_tol=1e-4)
        # CPU memory: peak RSS growth of one process per provider (Linux), else not measured
        assert r["mem_method"] == ("rss-subprocess" if rss else "none")
        assert (r["peak_mb"] is not None and r["peak_mb"] >= 0) == rss
        for k in ("loss_err", "de_err", "dc_err"):
            assert 0 <= r[k] < 1e-4, (name, k, r[k])
        assert (r["n"], r["d"], r["v"], r["data"], r["dtype"]) == (n, d, v, "flat", "fp32")
        assert r["exact"] is True and set(r) == set(report.ROW_FIELDS)
    if rss:  # eager forward+backward holds at least the logits
        assert rows["torch"]["peak_mb"] >= 0.9 * n * v * 4 / 2**20, rows["torch"]["peak_mb"]
    if not HAS_NATIVE:
        for name in ("torch-native", "torch-native-chunked"):
            assert rows[name]["status"] == "skipped" and "absent in torch" in rows[name]["error"]
    # Providers that cannot run here are in the results with the reason, not silently absent.
    assert rows["cutce-triton"]["status"] == "skipped" and "CUDA" in rows["cutce-triton"]["error"]
    assert rows["torch-compile"]["status"] == "skipped"
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_sweep_then_plot_only(tmp_path):
    args = ["bench", *TINY, "--sweep-n", "16,32", "--providers", "cutce-torch", "--mode", "fwd", "--in-process",
            "--no-plot", "--out", str(tmp_path)]
    assert main(args) == 0
    path, _, _ = _result(tmp_path)
    rows = [r for r in report.read_json(path)["rows"] if r["status"] == "ok"]
    assert sorted(r["n"] for r in rows) == [16, 32]
    assert all(r["fwdbwd_ms"] is None and r["fwd_ms"] > 0 for r in rows)
    assert not path.with_suffix(".png").exists()
    assert main(["bench", "--plot-only", str(path)]) == 0
    assert path.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


def test_a_failing_provider_gets_an_error_row_and_the_run_goes_on(tmp_path, monkeypatch):
    def build(device):
        def fn(h, w, t):
            raise RuntimeError("boom: out of memory")

        return fn

    monkeypatch.setitem(providers.PROVIDERS, "broken", providers.Provider("broken", True, build))
    # in-process: the monkeypatched provider does not exist in a child process
    args = ["bench", *TINY, "--providers", "broken,torch", "--in-process", "--no-plot", "--out", str(tmp_path)]
    assert main(args) == 0
    _, _, rows = _result(tmp_path)
    assert rows["broken"]["status"] == "error" and "boom" in rows["broken"]["error"]
    assert rows["broken"]["fwd_ms"] is None
    assert rows["torch"]["status"] == "ok"
    assert rows["torch"]["mem_method"] == "none" and rows["torch"]["peak_mb"] is None


def test_a_dying_child_process_gives_an_error_row(tmp_path):
    # A provider name the child does not know makes it exit with an exception, like a crash.
    res = measure.measure_in_subprocess("no-such-provider", tmp_path / "missing.pt")
    assert res.status == "error" and "subprocess exited with 1" in res.errors[0]


def test_native_providers_say_why_they_cannot_run(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    _, skipped = providers.select(["torch-native", "torch-native-chunked"], "cpu")
    assert [name for name, _ in skipped] == ["torch-native", "torch-native-chunked"]
    assert all("linear_cross_entropy is absent in torch" in why for _, why in skipped)


@pytest.mark.parametrize("kind", data.DATA_KINDS)
def test_data_kinds_are_deterministic(kind):
    shape = data.parse_shape("40,24,500")
    a = data.make_inputs(shape, kind, torch.bfloat16, "cpu", seed=3)
    b = data.make_inputs(shape, kind, torch.bfloat16, "cpu", seed=3)
    c = data.make_inputs(shape, kind, torch.bfloat16, "cpu", seed=4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    hidden, weight, targets = a
    assert hidden.shape == (40, 24) and weight.shape == (500, 24) and hidden.dtype == torch.bfloat16
    assert targets.dtype == torch.int64 and 0 <= targets.min() and targets.max() < 500
    if kind == "zipf":
        assert torch.all(hidden[:, 0] == 1)
        # column 0 of the weight is the log-prior -log(rank), a permutation of -log(1..V)
        ranks = torch.exp(-weight[:, 0].float())
        assert ranks.min() == 1.0 and ranks.max() == pytest.approx(500, rel=1e-2)


def test_shape_parsing_and_bad_arguments(capsys):
    assert data.parse_shape("gemma2-2b") == data.Shape("gemma2-2b", 8192, 2304, 256000)
    assert data.parse_shape("llama3-8b").v == 128256
    assert (data.parse_shape("7,8,9").n, data.parse_shape("7,8,9").v) == (7, 9)
    assert main(["bench", "--device", "cpu", "--shape", "1,2"]) == 2
    assert "N,D,V" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--providers"):
        providers.parse_provider_names(["cutce-torch,nope"])
    assert providers.parse_provider_names(["all"]) == list(providers.PROVIDERS)


def test_plot_only_rejects_other_files(tmp_path):
    other = tmp_path / "distill.json"
    report.write_json(other, "distill", {"date": "x"}, [])
    with pytest.raises(ValueError, match="'loss' benchmark"):
        main(["bench", "--plot-only", str(other)])


def test_demo_runs_the_example_script(tmp_path, monkeypatch):
    # `cutce demo` runs examples/demo.py with the remaining arguments as its own.
    fake = tmp_path / "demo.py"
    fake.write_text("import sys\nif __name__ == '__main__':\n"
                    "    open(sys.argv[0] + '.args', 'w').write(' '.join(sys.argv[1:]))\n"
                    "    raise SystemExit(3)\n")
    monkeypatch.setattr(cli, "_demo_path", lambda: fake)
    assert main(["demo", "--steps", "2"]) == 3
    assert (tmp_path / "demo.py.args").read_text() == "--steps 2"


def test_demo_without_the_example_says_where_to_get_it(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_demo_path", lambda: None)
    assert main(["demo"]) == 2
    assert "examples/demo.py" in capsys.readouterr().out
