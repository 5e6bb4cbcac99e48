"""The strategy "keep" (cutce.engine.planner): a per-token call on the Triton path whose budget
holds every logit stores them in the forward and turns them into the logit gradient in place in
the backward. Checked against float64 on materialized logits and against the recompute strategy
(memory_budget=0) through Triton's interpreter, at ragged shapes, with every launcher buffer
poisoned (on the GPU when there is one); the planner's choice on its own."""

from __future__ import annotations

import pytest
import torch

import cutce
from cutce.backends import triton_reason
from cutce.engine import planner
from cutce.engine.problem import Problem
from reference import make_inputs, oracle, rel_err
from triton_cases import OPTION_SETS, compare_option_set, to_dev
from triton_support import DEV

N, D, V = 67, 40, 203
BIG = 1e4  # a budget that holds every logit of these shapes

pytestmark = pytest.mark.skipif(triton_reason(torch.empty(0, device=DEV)) is not None,
                                reason="the Triton backend cannot run here")


@pytest.fixture
def kept_calls(monkeypatch):
    """How many backwards ran from kept logits."""
    from cutce.backends.triton import kept
    calls = []
    real = kept.backward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kept, "backward", spy)
    return calls


def _inputs(*args, **kwargs):
    """reference.make_inputs on the test device (CPU tensors run through the interpreter)."""
    return to_dev(DEV, *make_inputs(*args, **kwargs))


def _log_probs_ref(h, w, b, t, temperature, softcap, scale):
    z = scale * (h.double() @ w.double().T + b.double())
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lp = (z / temperature).log_softmax(-1)
    valid = t >= 0
    logp = lp.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    ent = -(lp.exp() * lp).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


def _grads(outs, upstream, *leaves):
    torch.autograd.backward([o.double() for o in outs], upstream)
    got = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_options_within_torch_error(gen, poisoned, kept_calls, dtype, name):
    """test_triton's option sets (every call returns its lse: per-token) against float64, within
    1.5x PyTorch's own low-precision error, by the kept logits (the default budget holds them at
    this size)."""
    compare_option_set(gen, dtype, name)
    assert len(kept_calls) == 1


@pytest.mark.parametrize("dtype,f32_ws", [(torch.float32, True), (torch.bfloat16, True),
                                          (torch.bfloat16, False), (torch.float16, False)])
def test_log_probs_entropy_match_float64_and_recompute(gen, poisoned, kernel_config, kept_calls,
                                                       dtype, f32_ws):
    kernel_config(interpreter_f32_workspace=f32_ws)  # False: the 16-bit buffer's own path
    h, w, t, b, _ = _inputs(gen, N, D, V, dtype, bias=True, ignore_frac=0.1)
    opts = dict(temperature=0.7, softcap=4.0, logit_scale=1.3, return_entropy=True, impl="triton")
    up = [torch.randn(N, generator=gen, dtype=torch.float64).to(DEV) for _ in range(2)]
    ref = _log_probs_ref(h, w, b, t, 0.7, 4.0, 1.3)
    ref_g = _grads(ref, up, h, w, b)
    kept = cutce.linear_log_probs(h, w, t, b, memory_budget=BIG, **opts)
    kept_g = _grads(kept, up, h, w, b)
    assert len(kept_calls) == 1
    again = cutce.linear_log_probs(h, w, t, b, memory_budget=0, **opts)
    again_g = _grads(again, up, h, w, b)
    assert len(kept_calls) == 1  # budget 0: recompute
    for a, r in zip(kept, again):  # same forward kernel: the values are unchanged by keeping
        assert torch.equal(a, r)
    # the kept logits are rounded to the inputs' dtype (less the target logit) before the
    # softmax of the backward: at most the recompute's error in float32, about it in bf16
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for k, r, x in zip(kept_g, again_g, ref_g):
        assert torch.isfinite(k).all()
        assert rel_err(k, x) <= max(tol, 1.5 * rel_err(r, x)), (rel_err(k, x), rel_err(r, x))


def test_cross_entropy_none_with_smoothing_class_weight_lse(gen, poisoned, kept_calls):
    h, w, t, b, tw = _inputs(gen, N, D, V, torch.float32, bias=True, token_weights=True,
                             ignore_frac=0.1)
    cw = (torch.rand(V, generator=gen) + 0.5).to(DEV)
    opts = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                return_lse=True, token_weights=tw)
    up = [torch.randn(N, generator=gen, dtype=torch.float64).to(DEV) for _ in range(2)]
    got = cutce.linear_cross_entropy(h, w, t, b, class_weight=cw, impl="triton",
                                     memory_budget=BIG, **opts)
    got_g = _grads(got, up, h, w, b)
    assert len(kept_calls) == 1
    hh, ww, bb = (x.detach().double().requires_grad_() for x in (h, w, b))
    ref = cutce.linear_cross_entropy(hh, ww, t, bb, class_weight=cw.double(), impl="torch", **opts)
    ref_g = _grads(ref, up, hh, ww, bb)
    for a, r in zip(got, ref):
        assert rel_err(a, r) < 1e-5
    for a, r in zip(got_g, ref_g):
        assert rel_err(a, r) < 1e-5


def test_plain_loss_none_matches_oracle(gen, poisoned, kept_calls):
    h, w, t, _, _ = _inputs(gen, (3, 29), D, V, torch.float32, ignore_frac=0.2)
    loss = cutce.linear_cross_entropy(h, w, t, reduction="none", shift=True, impl="triton",
                                      memory_budget=BIG)
    up = torch.randn(loss.shape, generator=gen).to(DEV)
    (loss * up).sum().backward()
    assert len(kept_calls) == 1
    hh, ww = (x.detach().double().requires_grad_() for x in (h, w))
    ref, _ = oracle(hh, ww, t, reduction="none", shift=True)
    (ref * up.double()).sum().backward()
    assert rel_err(loss, ref) < 1e-6
    assert rel_err(h.grad, hh.grad) < 1e-5 and rel_err(w.grad, ww.grad) < 1e-5


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_one_side_trains(gen, kept_calls, which):
    h, w, t, _, _ = _inputs(gen, N, D, V, torch.float32)
    (h if which == "weight" else w).requires_grad_(False)
    lp = cutce.linear_log_probs(h, w, t, impl="triton", memory_budget=BIG)
    lp.sum().backward()
    assert len(kept_calls) == 1
    hh, ww = (x.detach().double().requires_grad_() for x in (h, w))
    (hh @ ww.T).log_softmax(-1).gather(1, t[:, None]).sum().backward()
    leaf, ref = (h, hh) if which == "hidden" else (w, ww)
    assert rel_err(leaf.grad, ref.grad) < 1e-5


def test_second_backward_recomputes(gen, kept_calls):
    """The first backward consumes the kept logits; a second one through the same outputs
    (retain_graph) recomputes them and gives the same gradients."""
    h, w, t, _, _ = _inputs(gen, N, D, V, torch.float32)
    lp = cutce.linear_log_probs(h, w, t, impl="triton", memory_budget=BIG)
    lp.sum().backward(retain_graph=True)
    first = h.grad.clone()
    h.grad = None
    lp.sum().backward()
    assert len(kept_calls) == 1
    torch.testing.assert_close(h.grad, first, rtol=1e-5, atol=1e-6)


def test_no_grad_and_empty_keep_nothing(gen, kept_calls):
    h, w, t, _, _ = _inputs(gen, N, D, V, torch.float32)
    with torch.no_grad():
        cutce.linear_log_probs(h, w, t, impl="triton", memory_budget=BIG)
    lp = cutce.linear_log_probs(h[:0], w, t[:0], impl="triton", memory_budget=BIG)
    lp.sum().backward()
    assert kept_calls == [] and torch.equal(w.grad, torch.zeros_like(w))


def test_planner_keeps_only_what_fits():
    p = Problem(16384, 152064, 3584, torch.bfloat16, memory_budget=None)
    assert planner.plan(p, "triton").strategy == "recompute"  # 5 GB of logits > 2x the inputs
    big = Problem(16384, 152064, 3584, torch.bfloat16, memory_budget=5.0)
    assert planner.plan(big, "triton").strategy == "keep"
    assert planner.need_bytes(big, planner.KEEP, "triton") == (
        big.gradient_bytes() + 16384 * 152064 * 2)
    small = Problem(1024, 152064, 3584, torch.bfloat16)  # 0.3 GB under the default budget
    assert planner.plan(small, "triton").strategy == "keep"
    for other in (dict(memory_budget=0.0), dict(filtered=True), dict(need_h=False, need_w=False)):
        assert planner.plan(Problem(1024, 152064, 3584, torch.bfloat16, **other), "triton") \
            .strategy == "recompute"
    assert planner.plan(small, "torch").strategy == "recompute"
    assert planner.plan(Problem(1024, 152064, 3584, torch.bfloat16, reduced=True), "triton").fused


def test_out_of_memory_recomputes_and_warns_once(gen, monkeypatch, kept_calls):
    """Kept logits that do not fit beside what the device holds: the call recomputes instead,
    with the same values and gradients, and warns once."""
    from cutce import backends
    from cutce.backends.triton import kept

    def no_room(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB")

    h, w, t, _, _ = _inputs(gen, N, D, V, torch.float32)
    want = cutce.linear_log_probs(h, w, t, impl="triton", memory_budget=0)
    want.sum().backward()
    want_g = h.grad.clone()
    h.grad = None
    monkeypatch.setattr(kept, "buffer", no_room)
    monkeypatch.setattr(backends.resources, "_MEMORY_WARNED", set())
    with pytest.warns(UserWarning, match="recomputing them in the backward"):
        got = cutce.linear_log_probs(h, w, t, impl="triton", memory_budget=BIG)
    got.sum().backward()
    assert kept_calls == [] and torch.equal(got, want)
    torch.testing.assert_close(h.grad, want_g, rtol=1e-6, atol=1e-7)
