"""The fused training strategy (cutce.engine.planner): plans, and both backends against the float64 oracle.

The Triton path runs through the interpreter on CPU (CUDA on a GPU). Plans are forced with
monkeypatch so that tiny shapes walk every branch: one chunk, many chunks with the float32 dC
accumulator, the chunk's X in dC's own bytes, and rows whose loss exceeds 80 nats (rewritten).
"""

from __future__ import annotations

import pytest
import torch

import cutce
from cutce.engine import planner as plan
from cutce.engine.problem import Problem
from reference import lowp_torch, make_inputs, oracle, rel_err
from triton_support import DEV, IMPLS, requires_triton

GEMMA, LLAMA = (8192, 256000, 2304), (8192, 128256, 4096)


# ---- plans (pure arithmetic) --------------------------------------------------------------

def _problem(n, v, d, dtype=torch.bfloat16, budget=None, reduced=True, **kw):
    return Problem(n, v, d, dtype, reduced=reduced, memory_budget=budget, **kw)


def test_plan_minimum_budget_is_recompute():
    assert plan.plan(_problem(*GEMMA, budget=0.0), "triton").strategy == "recompute"
    assert plan.plan(_problem(*GEMMA, budget=2.0, reduced=False), "triton").strategy == "recompute"


@pytest.mark.parametrize("shape", [GEMMA, LLAMA, (65536, 256000, 2304), (16384, 32768, 4096)],
                         ids=["gemma", "llama", "gemma-65k", "v32k"])
def test_default_plan_fuses_within_budget(shape):
    p = plan.plan(_problem(*shape), "triton")
    assert p.fused and p.dc_f32 and p.dc_in_place and 2048 <= p.chunk_n <= shape[2]
    extra = plan.fused_extra_bytes(_problem(*shape), p.chunk_n, "triton")
    assert extra <= plan.DEFAULT_MEMORY_BUDGET["triton"] * _problem(*shape).gradient_bytes()


def test_plan_chunks_are_even():
    """Same number of chunks as the largest that fits, equal sizes: no thin last chunk."""
    assert plan.plan(_problem(*GEMMA), "triton").chunk_n == 2048  # 4 x 2048, not 3 x 2304 + 1280
    for n, chunk in ((4097, 4097), (5000, 2048), (9000, 2304), (70001, 2304), (66000, 2304)):
        assert plan.plan(_problem(n, 256000, 2304), "triton").chunk_n == chunk


def test_plan_budget_is_a_fraction_of_the_inputs():
    """memory_budget counts the inputs' bytes (hidden states and weights): for a loss that trains
    both they are the gradients'; a frozen head (LoRA) keeps the same budget, and with no dC
    to hold, chunks of X fit in it."""
    n, v, d = GEMMA
    assert not plan.plan(_problem(n, v, d, budget=1.0), "triton").fused
    frozen = _problem(n, v, d, need_w=False)
    assert frozen.input_bytes() == _problem(n, v, d).gradient_bytes()
    p = plan.plan(frozen, "triton")
    assert p.fused and not p.dc_f32 and not p.dc_in_place
    assert plan.fused_extra_bytes(frozen, p.chunk_n, "triton") <= 2.0 * frozen.input_bytes()


def test_plan_one_chunk_needs_no_accumulator():
    p = plan.plan(_problem(1024, 32768, 4096, budget=2.0), "triton")
    assert p.fused and p.chunk_n == 1024 and not p.dc_f32 and not p.dc_in_place


def test_plan_small_hidden_size_recomputes():
    """D=1024: the largest chunk living in dC's bytes is too thin to win (measured on the H200)."""
    assert not plan.plan(_problem(4092, 128256, 1024), "triton").fused


def test_torch_path_default_chunk_stays_within_native_memory():
    """The CPU case of the docs: chunk temporaries within the gradients' size (budget 1.0)."""
    prob = _problem(4096, 65536, 512, torch.float32)
    p = plan.plan(prob, "torch")
    assert p.fused and p.chunk_n == 256
    assert plan.fused_extra_bytes(prob, p.chunk_n, "torch") <= prob.gradient_bytes()


# ---- numerics -----------------------------------------------------------------------------

OPTS = {
    "plain": dict(),
    "zloss_softcap_scale": dict(z_loss=1e-2, softcap=3.0, logit_scale=1.3),
    "sum_weights": dict(reduction="sum", z_loss=1e-3),
    "smoothing": dict(label_smoothing=0.1),  # torch path fused; Triton path recomputes
}


def _grads(fn, h, w, b):
    xs = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    loss = fn(*xs)
    # an upstream gradient other than 1: the fused backward's in-place scaling must apply it
    return [loss, *torch.autograd.grad(loss, xs, torch.full_like(loss, 0.37))]


def _check(h, w, t, b, tw, opts, impl, factor=1.5, floor=None):
    dt = h.dtype
    floor = floor if floor is not None else {torch.float32: 2e-5, torch.bfloat16: 1e-2}[dt]
    kw = dict(token_weights=tw, **opts)
    got = _grads(lambda a, c, d: cutce.linear_cross_entropy(a, c, t, d, impl=impl, **kw), h, w, b)
    cpu = [x.detach().cpu() for x in (h, w, b)]
    kw_cpu = dict(kw, token_weights=None if tw is None else tw.cpu())
    want = _grads(lambda a, c, d: oracle(a, c, t.cpu(), d, **kw_cpu)[0], *[x.double() for x in cpu])
    lowp = _grads(lambda a, c, d: lowp_torch(a, c, t.cpu(), d, **kw_cpu)[0], *cpu)
    for name, a, lp, ref in zip(("loss", "dE", "dC", "dbias"), got, lowp, want):
        assert torch.isfinite(a).all(), name
        err, base = rel_err(a.cpu(), ref), rel_err(lp, ref)
        assert err <= factor * base + floor, f"{name}: {err:.3g} vs torch {dt} {base:.3g}"


def _inputs(gen, dtype, n=45, d=40, v=301, **kw):
    h, w, t, b, tw = make_inputs(gen, n, d, v, dtype, bias=True, token_weights=True,
                                 ignore_frac=0.2, **kw)
    return [None if x is None else x.to(DEV) for x in (h, w, t, b, tw)]


def _force(monkeypatch, p):
    seen = []
    monkeypatch.setattr(plan, "plan", lambda *a, **k: seen.append(p) or p)
    return seen


@pytest.mark.parametrize("name", list(OPTS))
@pytest.mark.parametrize("chunk", [1000, 16], ids=["one-chunk", "chunks"])
def test_torch_path_fused_matches_oracle(gen, monkeypatch, name, chunk):
    seen = _force(monkeypatch, plan.Plan("fused", chunk_n=chunk))
    h, w, t, b, tw = _inputs(gen, torch.float32)
    _check(h, w, t, b, tw, OPTS[name], "torch")
    assert seen, "the fused strategy must have run"


@requires_triton
@pytest.mark.parametrize("name", [k for k in OPTS if k != "smoothing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [1000, 16], ids=["one-chunk", "chunks"])
def test_triton_fused_matches_oracle(gen, monkeypatch, poisoned, name, dtype, chunk):
    seen = _force(monkeypatch, plan.Plan("fused", chunk_n=chunk, dc_f32=chunk < 45))
    h, w, t, b, tw = _inputs(gen, dtype)
    _check(h, w, t, b, tw, OPTS[name], "triton")
    assert seen


@requires_triton
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weights", ["none", "strided", "all-ignored"])
def test_row_prologue_kernel_matches_torch_coefs(gen, reduction, weights):
    """The one-launch row coefficients and targets flag (cutce.backends.triton.rows) against the torch
    ops it replaces (cutce.engine.loss.row_coefs and the api's check), over several of its blocks."""
    from cutce import api
    from cutce.engine import loss
    from cutce.backends.triton import rows
    n, v, ii = 203, 50, -100
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < 0.3] = ii
    if weights == "all-ignored":
        t[:] = ii
    tw = None
    if weights == "strided":
        tw = (torch.rand(2 * n, generator=gen, dtype=torch.float64) + 0.1)[::2]
    t, tw = t.to(DEV), None if tw is None else tw.to(DEV)
    for z in (0.0, 1e-2):
        opts = api.make_options(torch.float32, reduction=reduction, z_loss=z)
        coef, bad = rows.row_coefs(t, tw, v, ii, z, reduction == "mean")
        want = loss.row_coefs(t != ii, tw, opts, torch.float32, None, v)
        assert coef.shape == want.shape and coef.dtype == torch.float32
        torch.testing.assert_close(coef, want, rtol=1e-6, atol=0)
        assert bad.item() == 0
    for b in (v, -1):
        tb = t.clone()
        tb[n - 2] = b  # in the last, partial block
        assert rows.row_coefs(tb, tw, v, ii, 0.0, True)[1].item() == 1


@requires_triton
def test_triton_fused_bad_targets_raise(gen, monkeypatch):
    """A target outside [0, V) raises the api's error on the fused path too, whose targets
    check reads the prologue kernel's flag."""
    from cutce.backends.triton import rows
    _force(monkeypatch, plan.Plan("fused", chunk_n=16))
    ran = []
    real = rows.row_coefs
    monkeypatch.setattr(rows, "row_coefs", lambda *a: ran.append(1) or real(*a))
    h, w, t, b, tw = _inputs(gen, torch.float32)
    h.requires_grad_()
    cutce.linear_cross_entropy(h, w, t, b, token_weights=tw, impl="triton")
    assert ran, "the fused path's prologue kernel must have run"
    for bad in (301, -5):
        tb = t.clone()
        tb[40] = bad
        with pytest.raises(ValueError, match=rf"targets: expected class indices in \[0, 301\) "
                                             rf"or ignore_index=-100, got {bad}"):
            cutce.linear_cross_entropy(h, w, tb, b, token_weights=tw, impl="triton")


@requires_triton
@pytest.mark.parametrize("name", ["plain", "zloss_softcap_scale"])
def test_triton_fused_bulk_tile_store(gen, monkeypatch, kernel_config, name):
    """X written by a bulk (TMA) store (KernelConfig.loss_tile_store; off by default for the
    loss since the H200 A/B measured it within noise): ragged rows and classes clipped, every
    entry written (poisoned buffers)."""
    kernel_config(poison=True, loss_tile_store=True)
    _force(monkeypatch, plan.Plan("fused", chunk_n=16, dc_f32=True))
    h, w, t, b, tw = _inputs(gen, torch.float32)
    _check(h, w, t, b, tw, OPTS[name], "triton")


@requires_triton
def test_triton_fused_x_in_weight_grad_bytes(gen, monkeypatch, kernel_config):
    """16-bit X living in dC's own bytes until the float32 accumulator is copied in."""
    from cutce.backends.triton import fused
    kernel_config(interpreter_f32_workspace=False)
    _force(monkeypatch, plan.Plan("fused", chunk_n=16, dc_in_place=True, dc_f32=True))
    made = []
    real = fused._x_buffer
    monkeypatch.setattr(fused, "_x_buffer", lambda *a: made.append(a[4]) or real(*a))
    h, w, t, b, tw = _inputs(gen, torch.bfloat16, d=64, v=301)
    # the interpreter truncates the 16-bit X instead of rounding it: twice the rounding error
    _check(h, w, t, b, tw, dict(z_loss=1e-3), "triton", factor=3.0)
    assert made == [True]


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_rows_with_huge_loss(gen, monkeypatch, impl):
    """A target 200 nats below its row's max: X = exp(z - z_target) would overflow, so the
    row is rewritten with c = its max (Triton); the gradients stay exact."""
    if impl == "triton":
        _force(monkeypatch, plan.Plan("fused", chunk_n=16, dc_f32=True))
    h, w, t, b, tw = _inputs(gen, torch.float32)
    logits = (h @ w.T + b).detach()
    t[3] = logits[3].argmin()
    h = h.detach().clone()
    h[3] *= 200.0 / float(logits[3].max() - logits[3].min())
    _check(h, w, t, b, tw, dict(), impl)
    if impl == "triton":  # the rewrite is what keeps that row finite
        from cutce.backends.triton import fused
        monkeypatch.setattr(fused, "FAR_GAP", 1e30)
        with pytest.raises(AssertionError):
            _check(h, w, t, b, tw, dict(), impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_backward_once_and_recompute_twice(gen, impl):
    h, w, t, b, _ = _inputs(gen, torch.float32)
    h.requires_grad_()
    loss = cutce.linear_cross_entropy(h, w, t, b, impl=impl, memory_budget=10.0)  # fused
    (g,) = torch.autograd.grad(loss * 3.0, h, retain_graph=True)
    with pytest.raises(RuntimeError, match="memory_budget=0"):
        torch.autograd.grad(loss, h)
    loss0 = cutce.linear_cross_entropy(h, w, t, b, impl=impl, memory_budget=0)
    g0 = [torch.autograd.grad(loss0 * 3.0, h, retain_graph=True)[0] for _ in range(2)]
    for x in g0:
        torch.testing.assert_close(x, g, rtol=1e-5, atol=1e-7)


def test_fused_not_used_when_the_gradient_is_not_a_scalar(gen, monkeypatch):
    seen = _force(monkeypatch, plan.Plan("fused", chunk_n=8))
    h, w, t, b, _ = _inputs(gen, torch.float32)
    h.requires_grad_()
    cutce.linear_cross_entropy(h, w, t, reduction="none", impl="torch").sum().backward()
    cutce.linear_cross_entropy(h, w, t, return_lse=True, impl="torch")[0].backward()
    with torch.no_grad():
        cutce.linear_cross_entropy(h, w, t, impl="torch")
    assert not seen


def test_bad_memory_budget_raises(gen):
    h, w, t, b, _ = _inputs(gen, torch.float32)
    with pytest.raises(ValueError, match="memory_budget: expected a number >= 0"):
        cutce.linear_cross_entropy(h, w, t, memory_budget=-1.0)


def test_fused_backward_allocates_no_dc_sized_zeros(gen):
    """The fused op's non-differentiable outputs (lse, dE, dC, dbias) get no zero-filled upstream
    gradients from autograd: the backward only scales (a dC-sized memset per step otherwise)."""
    from torch.profiler import profile
    h, w, t, b, _ = _inputs(gen, torch.float32, n=256, d=16, v=301)
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = cutce.linear_cross_entropy(h, w, t, impl="torch", memory_budget=10.0)
    assert "fused" in type(loss.grad_fn).__name__
    with profile(record_shapes=True) as prof:
        loss.backward()
    zeroed = [e.input_shapes[0] for e in prof.events() if e.name == "aten::zero_" and e.input_shapes]
    assert list(w.shape) not in zeroed and list(h.shape) not in zeroed, zeroed
