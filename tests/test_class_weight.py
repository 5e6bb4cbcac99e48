"""class_weight= against F.cross_entropy(logits, targets, weight=class_weight, ...) on
materialized float64 logits, for every reduction, with label smoothing and ignore_index, on the
torch path (both strategies) and the Triton path (interpreter on CPU, CUDA on a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cutce

from reference import make_inputs, rel_err
from triton_support import DEV, IMPLS

CASES = {
    "mean": dict(reduction="mean"),
    "sum_smoothing": dict(reduction="sum", label_smoothing=0.2),
    "none_smoothing": dict(reduction="none", label_smoothing=0.1),
    "mean_smoothing_bias": dict(reduction="mean", label_smoothing=0.15, bias=True),
}


def _reference(h, w, t, b, cw, opts):
    """F.cross_entropy on float64 logits: PyTorch's own definition of weight= and smoothing."""
    logits = h.double() @ w.double().T + (0.0 if b is None else b.double())
    return F.cross_entropy(logits, t, weight=cw.double(), ignore_index=-100, **opts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("budget", [0.0, 10.0], ids=["recompute", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_class_weight_matches_f_cross_entropy(gen, impl, budget, case):
    opts = dict(CASES[case])
    has_bias = opts.pop("bias", False)
    h, w, t, b, _ = make_inputs(gen, 41, 24, 97, bias=has_bias, ignore_frac=0.2,
                                requires_grad=False)
    cw = torch.rand(97, generator=gen) * 2 + 0.1
    xs = [x.to(DEV).requires_grad_() for x in (h, w) + ((b,) if has_bias else ())]
    got = cutce.linear_cross_entropy(xs[0], xs[1], t.to(DEV), xs[2] if has_bias else None,
                                     class_weight=cw.to(DEV), impl=impl, memory_budget=budget,
                                     **opts)
    g_out = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((got.double() * g_out.to(DEV)).sum(), xs)
    ref_x = [x.detach().cpu().double().requires_grad_() for x in xs]
    want = _reference(ref_x[0], ref_x[1], t, ref_x[2] if has_bias else None, cw, opts)
    want_g = torch.autograd.grad((want * g_out).sum(), ref_x)
    assert rel_err(got.cpu(), want) < 1e-5
    for a, r in zip(grads, want_g):
        assert rel_err(a.cpu(), r) < 1e-5


def test_class_weight_all_ignored_is_zero(gen):
    h, w, t, _, _ = make_inputs(gen, 9, 8, 13)
    loss = cutce.linear_cross_entropy(h, w, torch.full_like(t, -100), class_weight=torch.ones(13))
    assert loss.item() == 0.0


@pytest.mark.parametrize("bad, match", [
    (torch.ones(12), r"class_weight: expected shape \(13,\)"),
    (torch.ones(13, dtype=torch.int64), "class_weight: expected None or a float tensor"),
    (torch.ones(13, requires_grad=True), "class_weight: expected a tensor that does not require grad"),
])
def test_bad_class_weight_raises(gen, bad, match):
    h, w, t, _, _ = make_inputs(gen, 9, 8, 13)
    with pytest.raises(ValueError, match=match):
        cutce.linear_cross_entropy(h, w, t, class_weight=bad)
