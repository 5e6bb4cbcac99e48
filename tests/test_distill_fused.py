"""The fused distillation strategy (cutce.backends.triton.distill_fused) against the float64 oracle, in
Triton's interpreter on CPU (CUDA on the device): several token chunks, poisoned buffers, every
beta it covers, and the plan that picks it. Helpers are distill_cases.py's."""

from __future__ import annotations

import pytest
import torch

import cutce
from cutce import distill
from distill_cases import check, make, to_dev
from triton_support import DEV

pytest.importorskip("triton")  # every test here runs the Triton path

from cutce.backends.triton import distill_ops
from cutce.backends.triton import distill_fused as kf
from cutce.engine import planner
from cutce.engine.problem import Problem


@pytest.fixture
def fused_calls(monkeypatch, kernel_config):
    """Poisoned launcher buffers, a small forced chunk, and the list of fused_total's calls."""
    calls = []
    real = kf.fused_total

    def spy(*args):
        calls.append(args[14:16])  # (chunk, x_in_dc)
        return real(*args)

    monkeypatch.setattr(kf, "fused_total", spy)
    kernel_config(poison=True, distill_chunk=20)
    return calls


# name: (beta, lead, (Ds, Dt, V), make's options, the loss's options). Aligned widths (Ds % 4 ==
# 0) load through tensor descriptors in the interpreter, ragged ones through pointers.
CASES = {
    "fkl": (0.0, 61, (32, 48, 257), dict(), dict()),
    "fkl-all": (0.0, 47, (29, 45, 300), dict(bias=True),
                dict(ce_weight=0.3, student_softcap=5.0, teacher_softcap=3.0, temperature=1.7,
                     reduction="sum")),
    "fkl-no-targets": (0.0, (3, 19), (24, 52, 263), dict(targets=False), dict(temperature=0.6)),
    "jsd": (0.5, 58, (29, 45, 270), dict(bias=True), dict(temperature=0.8)),
    "jsd-other-ce": (0.3, 45, (28, 60, 301), dict(),
                     dict(ce_weight=0.5, teacher_softcap=4.0, reduction="sum", temperature=1.3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_oracle(gen, case, fused_calls):
    beta, lead, (ds, dt, v), mk, opts = CASES[case]
    tensors = to_dev(DEV, make(gen, lead=lead, ds=ds, dt=dt, v=v, **mk))
    check(gen, tensors, torch.float32, impl="triton", beta=beta, **opts)
    assert fused_calls == [(20, False)]


@pytest.mark.parametrize("case,store", [("fkl", True), ("jsd-other-ce", True),
                                        ("jsd-other-ce", False)])  # aligned widths: descriptors
def test_fused_tile_store_both_ways(gen, case, store, fused_calls, monkeypatch, kernel_config):
    """X and dz through bulk (TMA) loads and stores (KernelConfig.distill_tile_store for
    distillation since the H200 A/B) or through tiles of addresses: ragged edges clipped, every
    entry written (poisoned buffers)."""
    kernel_config(distill_tile_store=store)
    made = []
    real = kf.tma_descriptor
    monkeypatch.setattr(kf, "tma_descriptor", lambda x, r, c: made.append(x.shape) or real(x, r, c))
    beta, lead, (ds, dt, v), mk, opts = CASES[case]
    tensors = to_dev(DEV, make(gen, lead=lead, ds=ds, dt=dt, v=v, **mk))
    check(gen, tensors, torch.float32, impl="triton", beta=beta, **opts)
    assert fused_calls == [(20, False)]
    assert any(shape[-1] == v for shape in made) == store, "X's descriptor iff bulk stores"


@pytest.mark.parametrize("case,store", [("fkl", True), ("fkl-no-targets", False),
                                        ("jsd", False), ("jsd-other-ce", True)])
def test_fused_student_x(gen, case, store, fused_calls, monkeypatch, kernel_config):
    """The student's Xs stored too (KernelConfig.distill_student_x, the default since the H200 A/B):
    the dz passes are elementwise (distill_dz) for calls without a CE term or student softcap;
    jsd-other-ce (CE term) keeps the product. Bulk or pointer stores of Xs, poisoned buffers.
    (test_fused_matches_oracle runs the default; the product form without a CE term is
    test_fused_peaked_teacher's student_x=False.)"""
    from cutce.backends.triton import distill_dz
    kernel_config(distill_student_x=True, distill_tile_store=store)
    passes = []
    real = distill_dz.dz_pass
    monkeypatch.setattr(distill_dz, "dz_pass", lambda *a: passes.append(a[-1]) or real(*a))
    beta, lead, (ds, dt, v), mk, opts = CASES[case]
    tensors = to_dev(DEV, make(gen, lead=lead, ds=ds, dt=dt, v=v, **mk))
    check(gen, tensors, torch.float32, impl="triton", beta=beta, **opts)
    assert fused_calls and all(c == (20, False) for c in fused_calls)
    if "ce" in case:
        assert passes == []
    else:
        assert passes and set(passes) == ({1, 2} if beta > 0 else {2})


@pytest.mark.parametrize("beta,student_x", [(0.0, False), (0.4, False), (0.0, True), (0.4, True)])
def test_fused_peaked_teacher(gen, beta, student_x, fused_calls, monkeypatch, kernel_config):
    """Teacher logits of std ~60: most of X underflows to 0 (p below e^-104 of its tile's max),
    where the JSD's m is (1 - beta) q alone, and KL(p||q) (from the forward's statistics) is
    large beside KL(p||m) = KL(p||q) + sum p (log q - log m): the loss value's cancellation.
    Also with the student's Xs stored (elementwise dz passes)."""
    kernel_config(distill_student_x=student_x)
    hs, ws, bs, ht, wt, bt, t = make(gen, lead=40, ds=24, dt=32, v=200)
    wt = (wt.detach() * 20.0).requires_grad_(False)
    check(gen, to_dev(DEV, (hs, ws, bs, ht, wt, bt, t)), torch.float32, impl="triton", beta=beta)
    assert fused_calls == [(20, False)]


def test_fused_16bit_x_in_dc_bytes(gen, fused_calls, monkeypatch, kernel_config):
    """16-bit heads with X (then dz) in dC's own bytes, dC summed in float32 over 3 chunks; the
    interpreter's 16-bit type is float16 (its stores truncate: 16-bit tolerance)."""
    monkeypatch.setattr(distill, "F16_TRITON", True)
    kernel_config(interpreter_f32_workspace=False)
    tensors = to_dev(DEV, make(gen, lead=53, ds=32, dt=48, v=300, dtype=torch.float16, bias=True))
    for beta in (0.0, 0.3):
        check(gen, tensors, torch.float16, impl="triton", beta=beta, ce_weight=0.2,
              student_softcap=6.0)
    assert fused_calls == [(20, True)] * 2


def test_fused_partial_needs_and_one_chunk(gen, fused_calls, monkeypatch, kernel_config):
    """Only dE (the weight frozen), only dC and the bias; and the whole batch in one chunk
    (dC written by one product, no accumulator)."""
    hs, ws, bs, ht, wt, bt, t = to_dev(DEV, make(gen, lead=41, ds=26, dt=40, v=260, bias=True))
    check(gen, (hs, ws.detach(), None, ht, wt, None, t), torch.float32, impl="triton")
    check(gen, (hs.detach(), ws, bs, ht, wt, bt, t), torch.float32, impl="triton", beta=0.5)
    kernel_config(distill_chunk=None)  # the plan's: all 41 tokens at once
    check(gen, (hs, ws, bs, ht, wt, bt, t), torch.float32, impl="triton", ce_weight=0.4)
    assert fused_calls == [(20, False), (20, False), (41, False)]


def test_budget_zero_and_uncovered_calls_keep_the_recompute_path(gen, fused_calls):
    hs, ws, bs, ht, wt, bt, t = to_dev(DEV, make(gen, lead=30, ds=24, dt=36, v=130, bias=True))
    check(gen, (hs, ws, bs, ht, wt, bt, t), torch.float32, impl="triton", memory_budget=0)
    check(gen, (hs, ws, bs, ht, wt, bt, t), torch.float32, impl="triton", beta=1.0)
    assert fused_calls == []
    def fuses(beta=0.0, budget=None, teacher_grad=False, grad=True):
        p = Problem(30, 130, 24, torch.float32, grad, grad, reduced=True, memory_budget=budget,
                    dt=36, beta=beta, teacher_grad=teacher_grad)
        return planner.plan(p, "triton").fused
    assert fuses() and fuses(0.5, 3.0)
    assert not fuses(1.0)  # reverse KL
    assert not fuses(0.0, 0.0)
    assert not fuses(teacher_grad=True)
    assert not fuses(grad=False)  # torch.no_grad(): no gradient to form


def test_plan_at_the_bench_shape():
    """Qwen2.5 7B -> 0.5B, 8192 tokens, bf16: the default's chunks (as before the budget counted
    both heads' inputs), the floor that keeps X in dC's bytes, and the bytes within the budget."""
    def prob(budget):
        return Problem(8192, 151936, 896, torch.bfloat16, reduced=True, memory_budget=budget,
                       dt=3584)
    for budget, want in ((None, (1408, False, False)), (0.5, (896, True, False)),
                         (8.0, (1408, False, False))):
        got = planner.plan(prob(budget), "triton")
        assert (got.chunk_n, got.dc_in_place, got.student_x) == want, (budget, got)
        assert got.dc_f32
        assert planner.distill_extra_bytes(prob(budget), got.chunk_n) <= \
            (budget or 2.0) * prob(budget).input_bytes()
    assert not planner.plan(prob(0.3), "triton").fused  # dC's accumulator alone is 0.4x
    # the student's Xs too: a second chunk x V buffer, so smaller chunks within a small budget;
    # without them where no chunk fits with them
    for budget, want in ((None, (1408, False, True)), (0.5, (512, True, True)),
                         (0.4, (896, True, False))):
        got = planner.plan(prob(budget), "triton", student_x=True)
        assert (got.chunk_n, got.dc_in_place, got.student_x) == want, (budget, got)
        assert planner.distill_extra_bytes(prob(budget), got.chunk_n, got.student_x) <= \
            (budget or 2.0) * prob(budget).input_bytes()
    assert not planner.plan(prob(0.0), "triton").fused


def test_memory_budget_validation_and_second_backward(gen):
    hs, ws, _, ht, wt, _, t = to_dev(DEV, make(gen, lead=9, v=40))
    for bad in (-1.0, "big", float("nan"), True):
        with pytest.raises(ValueError, match="memory_budget"):
            cutce.linear_distillation_loss(hs, ws, ht, wt, t, impl="triton", memory_budget=bad)
    loss = cutce.linear_distillation_loss(hs, ws, ht, wt, t, impl="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


def test_fused_op_opcheck(gen):
    hs, ws, bs, ht, wt, _, t = to_dev(DEV, make(gen, lead=21, ds=20, dt=24, v=67, bias=True,
                                             ignore_frac=0.0))
    c = torch.full((21,), 1 / 21, device=DEV)
    torch.library.opcheck(torch.ops.cutce.distill_fused_triton,
                          (hs, ws, bs, ht, wt, None, t, c, 0.5, 1.5, 0.0, 3.0, 0.2, None, [],
                           True, True, True),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_compile_plans_at_run_time(gen):
    """Under torch.compile the fused op makes its plan at run time: no new graph for a new token
    count, and a budget that fits no chunk runs the recompute kernels inside the op (same
    results as the recompute strategy)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    cnt = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(cutce.linear_distillation_loss, backend=cnt, dynamic=True, fullgraph=True)
    data = {n: to_dev(DEV, make(gen, lead=n, ds=20, dt=24, v=67, bias=True)) for n in (21, 34)}
    # budget 3 fits all 21 tokens but no chunk of 34 (float32, V=67): a plan made from N would
    # need another graph for 34 tokens
    for budget in (3.0, 1e-6):
        frames = []
        for n, (hs, ws, bs, ht, wt, _, t) in data.items():
            kw = dict(student_bias=bs, beta=0.5, ce_weight=0.2, impl="triton",
                      memory_budget=budget)
            a = fn(hs, ws, ht, wt, t, **kw)
            ga = torch.autograd.grad(a, (hs, ws, bs))
            b = cutce.linear_distillation_loss(hs, ws, ht, wt, t, **dict(kw, memory_budget=0))
            gb = torch.autograd.grad(b, (hs, ws, bs))
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
            for x, y in zip(ga, gb):
                assert torch.allclose(x, y, rtol=1e-3, atol=1e-6), (budget, n)
            frames.append(cnt.frame_count)
        assert frames[0] == frames[1], (budget, frames)
