"""linear_distillation_loss against the float64 oracle on materialized logits (reference.py)."""

from __future__ import annotations

import os
import weakref

import pytest
import torch

import cutce
from cutce.backends.pytorch import distill as torch_distill
from distill_cases import check, make, to_dev
from reference import distill_reference, rel_err
from triton_support import DEV, IMPLS

BETAS = (0.0, 0.5, 1.0, 0.3)
OPTION_SETS = {
    "plain": dict(),
    "temp": dict(temperature=2.5, reduction="sum"),
    "caps-ce": dict(student_softcap=5.0, teacher_softcap=3.0, temperature=0.7, ce_weight=0.3),
    "ce-none": dict(ce_weight=0.6, reduction="none"),
}


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_torch_matches_oracle(gen, beta, name):
    opts = OPTION_SETS[name]
    tensors = make(gen, bias=name != "plain", teacher_grad=name in ("caps-ce", "ce-none"))
    check(gen, tensors, torch.float32, beta=beta, **opts)


@pytest.mark.parametrize("beta", BETAS)
def test_float64_shift_chunks_teacher_grad(gen, beta, monkeypatch):
    # a few rows per chunk: the chunk loop, and gradients accumulated over chunks
    monkeypatch.setitem(torch_distill.CHUNK_BYTES, "cpu", 101 * 8 * torch_distill._TEMPS * 7)
    tensors = make(gen, lead=(3, 13), dtype=torch.float64, bias=True, teacher_grad=True)
    for red in ("mean", "none"):
        check(gen, tensors, torch.float64, beta=beta, shift=True, reduction=red, ce_weight=0.25,
              student_softcap=4.0, temperature=1.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_and_mixed_dtypes(gen, dtype):
    tensors = make(gen, dtype=dtype, bias=True, teacher_dtype=torch.float32)
    check(gen, tensors, dtype, beta=0.5, ce_weight=0.2)


def test_no_targets_every_token_counts(gen):
    hs, ws, _, ht, wt, _, _ = make(gen, lead=(2, 9), targets=False)
    for red in ("mean", "sum", "none"):
        out = check(gen, (hs, ws, None, ht, wt, None, None), torch.float32, beta=0.3, reduction=red,
                    shift=True)
        assert out.shape == ((2, 8) if red == "none" else ())


def test_frozen_teacher_gets_no_gradient_and_is_not_kept(gen):
    hs, ws, _, _, wt, _, t = make(gen)
    teacher_in = torch.randn(37, 45, generator=gen, requires_grad=True)
    with torch.no_grad():  # a frozen teacher's forward
        ht = teacher_in * 1.5
    alive = weakref.ref(ht)
    loss = cutce.linear_distillation_loss(hs, ws, ht, wt, t, beta=0.5)
    del ht  # mean/sum keep nothing of the teacher for the backward
    assert alive() is None
    loss.backward()
    assert hs.grad is not None and ws.grad is not None
    assert wt.grad is None and teacher_in.grad is None


def test_empty_and_fully_ignored(gen):
    hs, ws, bs, ht, wt, bt, t = make(gen, bias=True, teacher_grad=True)
    t_all = torch.full_like(t, -100)
    for red in ("mean", "sum"):
        loss = cutce.linear_distillation_loss(hs, ws, ht, wt, t_all, student_bias=bs,
                                              teacher_bias=bt, reduction=red, ce_weight=0.5)
        grads = torch.autograd.grad(loss, (hs, ws, bs, ht, wt, bt))
        assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
    none = cutce.linear_distillation_loss(hs, ws, ht, wt, t_all, reduction="none")
    assert none.shape == t.shape and (none == 0).all()
    e = cutce.linear_distillation_loss(hs[:0], ws, ht[:0], wt, t[:0])
    (g,) = torch.autograd.grad(e, (ws,))
    assert e.item() == 0.0 and (g == 0).all()
    assert cutce.linear_distillation_loss(hs[:0], ws, ht[:0], wt, t[:0], reduction="none").shape == (0,)


@pytest.mark.parametrize("impl", IMPLS)
def test_ce_weight_one_is_cross_entropy(gen, impl):
    tensors = to_dev(DEV if impl == "triton" else "cpu", make(gen, lead=(3, 7), bias=True,
                                                           teacher_grad=True))
    out = check(gen, tensors, torch.float32, impl=impl, ce_weight=1.0, beta=0.3, shift=True)
    hs, ws, bs, ht, wt, bt, t = tensors
    ce = torch.nn.functional.cross_entropy((hs[:, :-1] @ ws.T + bs).flatten(0, 1).double(),
                                           t[:, 1:].flatten())
    assert rel_err(out, ce) < 1e-6


def test_nan_in_ignored_row_gives_finite_loss(gen):
    hs, ws, _, ht, wt, _, t = make(gen)
    t = t.clone()
    t[3] = -100
    hs2 = hs.detach().clone()
    hs2[3] = float("nan")
    for red in ("mean", "none"):
        out = cutce.linear_distillation_loss(hs2, ws, ht, wt, t, beta=0.5, reduction=red)
        assert torch.isfinite(out).all()


def test_fused_backward_once_and_none_twice(gen):
    hs, ws, _, ht, wt, _, t = make(gen)
    loss = cutce.linear_distillation_loss(hs, ws, ht, wt, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()
    rows = cutce.linear_distillation_loss(hs, ws, ht, wt, t, reduction="none").sum()
    a = torch.autograd.grad(rows, ws, retain_graph=True)[0]
    b = torch.autograd.grad(rows, ws)[0]
    assert torch.equal(a, b)


def test_autocast_and_eval_without_grad(gen):
    hs, ws, _, ht, wt, _, t = make(gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cutce.linear_distillation_loss(hs, ws, ht, wt, t, beta=0.5)
    ref = distill_reference(hs.bfloat16(), ws.bfloat16(), ht.bfloat16(), wt.bfloat16(), t, beta=0.5)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-5
    with torch.no_grad():
        ev = cutce.linear_distillation_loss(hs, ws, ht, wt, t, beta=0.5)
    assert ev.grad_fn is None and rel_err(ev, distill_reference(hs, ws, ht, wt, t, beta=0.5)) < 1e-5


def test_compile_aot_eager(gen):
    hs, ws, _, ht, wt, _, t = make(gen)
    fn = torch.compile(cutce.linear_distillation_loss, backend="aot_eager", fullgraph=True)
    for red in ("mean", "none"):
        out = fn(hs, ws, ht, wt, t, beta=0.3, temperature=2.0, reduction=red)
        ref = cutce.linear_distillation_loss(hs, ws, ht, wt, t, beta=0.3, temperature=2.0, reduction=red)
        ga = torch.autograd.grad(out.sum(), (hs, ws))
        gb = torch.autograd.grad(ref.sum(), (hs, ws))
        assert torch.allclose(out, ref) and all(torch.allclose(a, b) for a, b in zip(ga, gb))


def _bad_calls(gen):
    hs, ws, bs, ht, wt, bt, t = make(gen, bias=True)
    wrong_v = torch.randn(100, 45)
    return [
        ((hs, ws, ht, wrong_v, t), {}, "teacher_weight: expected 101 rows"),
        ((hs, ws, ht[:5], wt, t), {}, "teacher_hidden: expected shape (37,)"),
        ((hs, ws, ht, wt, None), dict(ce_weight=0.5), "targets: expected a tensor"),
        ((hs, ws, ht, wt, t), dict(beta=1.5), "beta: expected a number <= 1.0"),
        ((hs, ws, ht, wt, t), dict(beta=float("nan")), "beta: expected a finite number"),
        ((hs, ws, ht, wt, t), dict(temperature=0.0), "temperature: expected a number > 0.0"),
        ((hs, ws, ht, wt, t), dict(student_softcap=-1.0), "student_softcap: expected a number > 0"),
        ((hs, ws, ht, wt, t), dict(teacher_softcap="x"), "teacher_softcap: expected a finite"),
        ((hs, ws, ht, wt, t), dict(ce_weight=-0.1), "ce_weight: expected a number >= 0"),
        ((hs, ws, ht, wt, t), dict(reduction="avg"), "reduction: expected one of"),
        ((hs, ws, ht, wt, t), dict(ignore_index=1.5), "ignore_index: expected an int"),
        ((hs, ws, ht, wt, t), dict(shift=1), "shift: expected a bool"),
        ((hs, ws, ht, wt, t), dict(impl="cuda"), "impl: expected one of"),
        ((hs, ws.double(), ht, wt, t), {}, "student_weight dtype: expected hidden's dtype"),
        ((hs, ws, ht, wt.T, t), {}, "teacher_weight: expected shape (V, 45)"),
        ((hs, ws, ht, wt, t), dict(teacher_bias=bt[:7]), "teacher_bias: expected None or a tensor"),
        ((hs, ws, ht, wt, t.float()), {}, "targets dtype: expected torch.int64"),
        ((hs, ws, ht, wt, t.clamp(max=0) + 101), {}, "targets: expected class indices in [0, 101)"),
        ((hs.int(), ws, ht, wt, t), {}, "student_hidden dtype: expected float16"),
        ((hs, ws, "ht", wt, t), {}, "teacher_hidden: expected a torch.Tensor"),
    ]


def test_validation_errors(gen):
    for args, kwargs, msg in _bad_calls(gen):
        with pytest.raises(ValueError) as e:
            cutce.linear_distillation_loss(*args, **kwargs)
        assert msg in str(e.value), (msg, str(e.value))


def test_bench_cpu_smoke(tmp_path):
    """benchmarks/distill.py --cpu-smoke runs every provider it can and writes its JSON."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "distill.py"
    spec = importlib.util.spec_from_file_location("bench_distill", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--cpu-smoke", "--providers", "cutce,cutce-torch,torch,compile,nope",
                       "--out", str(tmp_path)])
    ok = {(r["beta"], r["provider"]) for r in rows if r["status"] == "ok"}
    assert {(b, p) for b in (0.0, 0.5) for p in ("cutce", "cutce-torch", "torch")} <= ok
    assert all(r["dE_err"] < 1e-5 for r in rows if r["status"] == "ok")
    doc = json.loads((tmp_path / "distill_cpu_beta0_0.5.json").read_text())
    assert doc["benchmark"] == "distill" and doc["meta"]["device"] == "cpu"
    assert len(doc["rows"]) == len(rows) and doc["rows"][0]["v"] == 300


def test_docs_distillation_example_runs(tmp_path):
    """docs/distillation.md's loop with two HF models runs and matches its materialized check."""
    import pathlib
    import re
    import subprocess
    import sys

    pytest.importorskip("transformers")
    root = pathlib.Path(__file__).resolve().parent.parent
    (code,) = [b for b in re.findall(r"```python\n(.*?)```",
                                     (root / "docs" / "distillation.md").read_text(), re.S)
               if "from transformers import" in b]
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ours, dense = re.search(r"cutce ([\d.]+), from materialized logits ([\d.]+)", proc.stdout).groups()
    assert abs(float(ours) - float(dense)) < 1e-5
