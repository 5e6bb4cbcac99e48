"""Regressions: wrong results found by a randomized float64 check, and input a new user meets.

Each test states the definition it checks against (a float64 computation on materialized
logits, or PyTorch's own F.cross_entropy) on the torch path (float64) and the Triton kernels
(float32, through the interpreter on CPU).
"""

from __future__ import annotations


import torch

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cutce  # noqa: E402
import dense_ce  # noqa: E402
from reference import rel_err  # noqa: E402
from triton_support import DEV, HAS_TRITON, IMPLS as PATHS, requires_triton  # noqa: E402

IMPLS = [("torch", torch.float64, 1e-12)] + ([("triton", torch.float32, 1e-5)] if HAS_TRITON else [])
BUDGETS = (0.0, 100.0)  # the recompute and the fused strategy


def _leaf(x, dtype):
    return x.detach().to(DEV, dtype, copy=True).requires_grad_()


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("impl,dtype,tol", IMPLS)
def test_z_loss_kept_for_targets_of_class_weight_zero(impl, dtype, tol, budget):
    # loss_i = c[t_i] * CE_i + z_loss * lse_i^2: the z-loss term does not carry the class weight,
    # so a target of class weight 0 still adds z_loss * lse^2 (and its gradient).
    g = torch.Generator().manual_seed(0)
    h64, w64 = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3])
    cw = torch.tensor([0.0, 1, 1, 1, 1], dtype=torch.float64)
    h, w = _leaf(h64, dtype), _leaf(w64, dtype)
    loss = cutce.linear_cross_entropy(h, w, t.to(DEV), class_weight=cw.to(DEV, dtype), z_loss=1e-2,
                                      reduction="sum", impl=impl, memory_budget=budget)
    loss.backward()
    rh, rw = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    ref, _ = dense_ce.cross_entropy(rh, rw, t, class_weight=cw, z_loss=1e-2, reduction="sum")
    ref.backward()
    assert ref.item() == pytest.approx(5.566004851800761, rel=1e-12)
    assert loss.item() == pytest.approx(ref.item(), rel=tol)
    assert rel_err(h.grad.cpu(), rh.grad) < tol and rel_err(w.grad.cpu(), rw.grad) < tol
    assert h.grad[0].abs().sum() > 0  # row 0: class weight 0, z-loss gradient only


@requires_triton
def test_filter_eps_keeps_the_lse_gradient_of_ignored_rows():
    # With return_lse, an ignored row's lse is differentiated too: the class bound that
    # filter_eps uses must cover it (it covered only rows with a target).
    w = torch.eye(8, device=DEV)
    h = torch.zeros(2, 8, device=DEV)
    h[0, 1] = h[1, 5] = 20.0
    h.requires_grad_()
    t = torch.tensor([1, -100], device=DEV)
    loss, lse = cutce.linear_cross_entropy(h, w, t, return_lse=True, filter_eps=1e-6,
                                           impl="triton")
    (loss + lse.sum()).backward()
    p1 = torch.softmax(h.detach()[1].double().cpu() @ w.double().cpu().T, 0)
    assert h.grad[1, 5].item() == pytest.approx(p1[5].item(), rel=1e-6)  # ~ e5
    assert (h.grad[1].double().cpu() - p1).abs().max() < 1e-6  # the filtered tail is < eps


@requires_triton
def test_filter_eps_return_lse_against_float64():
    g = torch.Generator().manual_seed(3)
    h64, w64 = torch.randn(23, 19, generator=g, dtype=torch.float64), torch.randn(37, 19, generator=g, dtype=torch.float64)
    t = torch.randint(0, 37, (23,), generator=g)
    t[::3] = -100
    h, w = _leaf(h64, torch.float32), _leaf(w64, torch.float32)
    loss, lse = cutce.linear_cross_entropy(h, w, t.to(DEV), return_lse=True, filter_eps=2.0**-24,
                                           impl="triton")
    up = torch.randn(23, generator=g, dtype=torch.float64)
    (loss + (lse * up.to(DEV, torch.float32)).sum()).backward()
    rh, rw = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    rl, rlse = dense_ce.cross_entropy(rh, rw, t)
    (rl + (rlse * up).sum()).backward()
    assert rel_err(h.grad.cpu(), rh.grad) < 1e-5 and rel_err(w.grad.cpu(), rw.grad) < 1e-5


def _empty_inputs(dtype, d, grad_teacher=False):
    # shift=True on one-token sequences: zero tokens (the case that reached Triton's descriptor)
    h = torch.randn(3, 1, d, dtype=dtype, device=DEV, requires_grad=True)
    w = torch.randn(7, d, dtype=dtype, device=DEV, requires_grad=True)
    b = torch.randn(7, dtype=dtype, device=DEV, requires_grad=True)
    ht = torch.randn(3, 1, d, dtype=dtype, device=DEV, requires_grad=grad_teacher)
    wt = torch.randn(7, d, dtype=dtype, device=DEV, requires_grad=grad_teacher)
    t = torch.randint(0, 7, (3, 1), device=DEV)
    return h, w, b, ht, wt, t


def _check_empty_grads(out, leaves):
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    for x, gr in zip(leaves, grads):
        assert gr is None or (gr.shape == x.shape and not gr.any())


@pytest.mark.parametrize("d", [16, 12])  # 16: rows 16-byte aligned (tensor descriptors)
@pytest.mark.parametrize("impl", PATHS)
def test_zero_tokens_every_entry(impl, d):
    dtype = torch.float32
    for reduction in ("mean", "sum", "none"):
        for budget in (0.0, None):
            h, w, b, _, _, t = _empty_inputs(dtype, d)
            out = cutce.linear_cross_entropy(h, w, t, b, shift=True, reduction=reduction,
                                             impl=impl, memory_budget=budget)
            assert out.shape == ((3, 0) if reduction == "none" else ())
            assert not out.any()
            _check_empty_grads(out, (h, w, b))
    h, w, b, _, _, t = _empty_inputs(dtype, d)
    loss, lse = cutce.linear_cross_entropy(h, w, t, b, shift=True, return_lse=True,
                                           filter_eps=1e-3, impl=impl)
    assert lse.shape == (3, 0)
    _check_empty_grads(loss + lse.sum(), (h, w, b))
    lp, ent = cutce.linear_log_probs(h, w, t, b, shift=True, return_entropy=True, impl=impl)
    assert lp.shape == ent.shape == (3, 0)
    _check_empty_grads(lp.sum() + ent.sum(), (h, w, b))
    for beta in (0.0, 0.5, 1.0):
        for reduction in ("mean", "none"):
            for budget, teacher in ((0.0, False), (None, False), (None, True)):
                h, w, b, ht, wt, t = _empty_inputs(dtype, d, teacher)
                out = cutce.linear_distillation_loss(
                    h, w, ht, wt, t, student_bias=b, beta=beta, ce_weight=0.3,
                    reduction=reduction, shift=True, impl=impl, memory_budget=budget)
                assert out.shape == ((3, 0) if reduction == "none" else ())
                assert not out.any()
                _check_empty_grads(out, (h, w, b, ht, wt) if teacher else (h, w, b))


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("impl,dtype,tol", IMPLS)
def test_mean_with_zero_denominator_is_nan(impl, dtype, tol, budget):
    g = torch.Generator().manual_seed(1)
    h64, w64 = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, -100, 1, 0])
    cw = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    # valid targets whose class weights are all 0: 0/0, as PyTorch
    want = F.cross_entropy(h64 @ w64.T, t, weight=cw)
    assert torch.isnan(want)
    h = _leaf(h64, dtype)
    got = cutce.linear_cross_entropy(h, w64.to(DEV, dtype), t.to(DEV), class_weight=cw.to(DEV, dtype),
                                     impl=impl, memory_budget=budget)
    assert torch.isnan(got)
    got.backward()
    assert torch.isnan(h.grad[0]).all() and not h.grad[3].any()  # ignored row: 0, as PyTorch
    # valid tokens whose token weights are all 0
    h = _leaf(h64, dtype)
    got = cutce.linear_cross_entropy(h, w64.to(DEV, dtype), t.to(DEV), impl=impl,
                                     token_weights=torch.zeros(6, device=DEV, dtype=dtype),
                                     memory_budget=budget)
    assert torch.isnan(got)
    # no valid target at all: 0.0 with zero gradients (documented, kept)
    h = _leaf(h64, dtype)
    got = cutce.linear_cross_entropy(h, w64.to(DEV, dtype), torch.full((6,), -100, device=DEV),
                                     impl=impl, memory_budget=budget)
    got.backward()
    assert got.item() == 0.0 and not h.grad.any()


def test_log_probs_errors_name_tokens():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    bad = {"tokens: expected class indices": torch.tensor([0, 1, 9]),
           "tokens dtype": torch.tensor([0.0, 1, 2]),
           "tokens: expected shape": torch.tensor([0, 1]),
           "tokens: expected a torch.Tensor": [0, 1, 2]}
    for msg, tokens in bad.items():
        with pytest.raises(ValueError, match=msg):
            cutce.linear_log_probs(h, w, tokens, impl="torch")


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("impl,dtype,tol", IMPLS)
def test_non_finite_hidden_gives_nan_as_pytorch(impl, dtype, tol, budget, value):
    g = torch.Generator().manual_seed(2)
    h64, w64 = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    h64[1, 2] = value
    t = torch.tensor([0, 1, 2, 3])
    want = F.cross_entropy(h64 @ w64.T, t, reduction="none")
    assert torch.isnan(want[1]) and torch.isfinite(want[[0, 2, 3]]).all()
    h = _leaf(h64, dtype)
    w = w64.to(DEV, dtype)
    for reduction in ("mean", "sum"):
        assert torch.isnan(cutce.linear_cross_entropy(h, w, t.to(DEV), reduction=reduction,
                                                      impl=impl, memory_budget=budget))
    rows = cutce.linear_cross_entropy(h, w, t.to(DEV), reduction="none", impl=impl)
    assert torch.isnan(rows[1])
    assert rel_err(rows[[0, 2, 3]].cpu(), want[[0, 2, 3]]) < tol
    lp = cutce.linear_log_probs(h, w, t.to(DEV), impl=impl)
    assert torch.isnan(lp[1]) and torch.isfinite(lp[[0, 2, 3]]).all()


def test_packed_sequences_marked_with_ignore_index():
    # The documented way to pack: the target at each sequence's first position is ignore_index;
    # then one shifted call over the packed row equals the sum over the separate sequences.
    g = torch.Generator().manual_seed(4)
    lens = [5, 3, 7]
    hs = [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in lens]
    ts = [torch.randint(0, 9, (n,), generator=g) for n in lens]
    w = torch.randn(9, 6, generator=g, dtype=torch.float64)
    separate = sum(cutce.linear_cross_entropy(h, w, t, shift=True, reduction="sum", impl="torch")
                   for h, t in zip(hs, ts))
    packed_t = torch.cat([torch.cat([torch.tensor([-100]), t[1:]]) for t in ts])
    packed = cutce.linear_cross_entropy(torch.cat(hs)[None], w, packed_t[None], shift=True,
                                        reduction="sum", impl="torch")
    assert packed.item() == pytest.approx(separate.item(), rel=1e-12)
