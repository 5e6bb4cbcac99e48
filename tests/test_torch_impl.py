"""Semantics of the torch path against the float64 oracle built from materialized logits.

Accuracy rule: cutce's error against float64 may exceed PyTorch's own low-precision path's error
(logits in the input dtype, loss in float32) by at most a factor 1.5 plus a tiny floor; float64
inputs must match to ~1e-12. Errors are relative norms ||a - b|| / ||b||.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cutce import linear_cross_entropy
from cutce.backends.pytorch import ce as torch_impl
from cutce.engine.options import Options
from reference import DTYPES, lowp_torch, make_inputs, oracle, rel_err

SHAPES = {"37x29x101": ((37,), 29, 101), "3x17x64x257": ((3, 17), 64, 257)}

# name -> (make_inputs kwargs, loss kwargs)
CONFIGS = {
    "plain": ({}, {}),
    "bias": (dict(bias=True), {}),
    "softcap": ({}, dict(softcap=2.0)),
    "scale": ({}, dict(logit_scale=0.6)),
    "bias_scale_softcap": (dict(bias=True), dict(logit_scale=1.7, softcap=3.0)),
    "smoothing": ({}, dict(label_smoothing=0.1)),
    "zloss": ({}, dict(z_loss=0.01)),
    "weights_ignore": (dict(token_weights=True, ignore_frac=0.25), {}),
    "ignore_in_vocab": (dict(ignore_frac=0.2, ignore_index=5), dict(ignore_index=5)),
    "shift_sum": (dict(token_weights=True, ignore_frac=0.1), dict(shift=True, reduction="sum")),
    "none_smooth_z": (dict(ignore_frac=0.3, bias=True), dict(reduction="none", label_smoothing=0.3, z_loss=1e-3)),
    "all_mean": (dict(bias=True, token_weights=True, ignore_frac=0.2, ignore_index=-1),
                 dict(ignore_index=-1, label_smoothing=0.05, z_loss=1e-4, softcap=5.0,
                      logit_scale=1.3, shift=True)),
    "all_none_full_smoothing": (dict(bias=True, token_weights=True, ignore_frac=0.2),
                                dict(reduction="none", label_smoothing=1.0, softcap=1.5, shift=True)),
}

FLOOR = 1e-7  # tiny absolute floor on the relative error (float32's eps is 1.2e-7)


def _run(fn, h, w, t, b, tw, kw, cot, leaf_dtype=None):
    """(loss, lse, grads of the loss, grads of lse) of fn at fresh leaves copied from h, w, b
    (converted exactly to ``leaf_dtype``: float64 for the oracle, so its gradients are not
    rounded back to the input dtype)."""
    leaves = [x.detach().to(leaf_dtype or x.dtype, copy=True).requires_grad_() if x is not None
              else None for x in (h, w, b)]
    loss, lse = fn(leaves[0], leaves[1], t, leaves[2], token_weights=tw, **kw)
    params = [x for x in leaves if x is not None]
    outs = loss if loss.dim() == 0 else (loss * cot).sum()
    g_loss = torch.autograd.grad(outs, params, retain_graph=True)
    g_lse = torch.autograd.grad((lse * cot.to(lse.dtype)).sum(), params)
    return loss.detach(), lse.detach(), g_loss, g_lse


def _cutce(h, w, t, b, **kw):
    return linear_cross_entropy(h, w, t, b, return_lse=True, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_accuracy_vs_float64_and_torch(gen, config, shape, dtype):
    _check_accuracy(gen, config, SHAPES[shape], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("config", ["all_mean", "none_smooth_z"])
def test_accuracy_larger_ragged_shape(gen, config, dtype):
    _check_accuracy(gen, config, ((252,), 507, 123), dtype)


def _check_accuracy(gen, config, shape, dtype):
    lead, d, v = shape
    mk, kw = CONFIGS[config]
    h, w, t, b, tw = make_inputs(gen, lead, d, v, dtype, **mk)
    out_lead = lead[:-1] + (lead[-1] - 1,) if kw.get("shift") else lead
    cot = torch.randn(out_lead, generator=gen, dtype=torch.float64)
    got = _run(_cutce, h, w, t, b, tw, kw, cot)
    ref = _run(oracle, h, w, t, b, tw, kw, cot, leaf_dtype=torch.float64)
    low = _run(lowp_torch, h, w, t, b, tw, kw, cot)
    names = ["loss", "lse"] + [f"d{n}/loss" for n in "hwb"[:len(got[2])]] \
        + [f"d{n}/lse" for n in "hwb"[:len(got[3])]]
    flat = lambda r: [r[0], r[1], *r[2], *r[3]]  # noqa: E731
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == got[1].dtype == out_dt
    for name, a, r, lo, x in zip(names, flat(got), flat(ref), flat(low), [None, None, h, w, b, h, w, b]):
        assert torch.isfinite(a).all(), name
        if name.startswith("d"):
            assert a.dtype == dtype, name
        err = rel_err(a, r)
        if dtype == torch.float64:
            assert err <= 1e-12, f"{name}: float64 error {err:.3g}"
        else:
            bound = 1.5 * rel_err(lo, r) + FLOOR
            assert err <= bound, f"{name}: error {err:.3g} > 1.5 x torch's {rel_err(lo, r):.3g} + {FLOOR}"


def test_loss_matches_f_cross_entropy(gen):
    """Plain case against PyTorch's own F.cross_entropy (incl. label smoothing and ignore)."""
    h, w, t, b, _ = make_inputs(gen, 53, 16, 97, torch.float64, bias=True, ignore_frac=0.2)
    logits = h @ w.T + b
    for ls in (0.0, 0.25):
        ref = torch.nn.functional.cross_entropy(logits, t, label_smoothing=ls, reduction="none")
        got = linear_cross_entropy(h, w, t, b, label_smoothing=ls, reduction="none")
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        ref = torch.nn.functional.cross_entropy(logits, t, label_smoothing=ls)
        torch.testing.assert_close(linear_cross_entropy(h, w, t, b, label_smoothing=ls), ref,
                                   rtol=1e-12, atol=1e-12)


def _all(h, w, t, b, tw, **kw):
    """Outputs and grads of loss and lse, for exact comparisons between two calls."""
    cot = torch.linspace(-1, 2, t[..., 1:].numel() if kw.get("shift") else t.numel(), dtype=torch.float64)
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    loss, lse = linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], token_weights=tw,
                                     return_lse=True, reduction="none", **kw)
    ((loss.double().flatten() * cot).sum() + (lse.double().flatten() * cot.flip(0)).sum()).backward()
    return [loss, lse] + [x.grad for x in leaves]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_chunk_size_does_not_change_result(gen, dtype, tol):
    h, w, t, b, tw = make_inputs(gen, (4, 13), 24, 83, dtype, bias=True, token_weights=True, ignore_frac=0.2)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, logit_scale=1.1, shift=True)
    default = _all(h, w, t, b, tw, **kw)
    bytes_per_row = 83 * (8 if dtype == torch.float64 else 4) * torch_impl._TEMPS_PER_CHUNK
    for chunk_bytes in (1, 5 * bytes_per_row, 5 * bytes_per_row + 7):  # 1 row; ragged last chunk
        assert torch_impl.chunk_rows(48, 83, torch_impl.compute_dtype(dtype), chunk_bytes) in (1, 5)
        for a, r in zip(_all(h, w, t, b, tw, chunk_bytes=chunk_bytes, **kw), default):
            assert rel_err(a, r) <= tol


def test_chunk_rows_respects_budget():
    for n, v, budget in ((1000, 50257, 2**20), (7, 11, 10**9), (10**6, 256000, 256 * 2**20), (5, 3, 1)):
        rows = torch_impl.chunk_rows(n, v, torch.float32, budget)
        assert 1 <= rows <= n
        assert rows == 1 or rows * v * 4 * torch_impl._TEMPS_PER_CHUNK <= budget


def test_shift_equals_slicing(gen):
    h, w, t, b, tw = make_inputs(gen, (3, 17), 32, 71, torch.float64, bias=True, token_weights=True,
                                 ignore_frac=0.2)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    for reduction in ("mean", "sum", "none"):
        hs = h.detach().clone().requires_grad_()
        a = linear_cross_entropy(hs, w, t, b, token_weights=tw, shift=True, reduction=reduction, **kw)
        hc = h.detach().clone().requires_grad_()
        r = linear_cross_entropy(hc[:, :-1], w, t[:, 1:], b, token_weights=tw[:, 1:],
                                 reduction=reduction, **kw)
        torch.testing.assert_close(a, r, rtol=1e-13, atol=1e-13)
        a.sum().backward()
        r.sum().backward()
        torch.testing.assert_close(hs.grad, hc.grad, rtol=1e-13, atol=1e-13)
        assert not hs.grad[:, -1].any()  # the last position predicts nothing


def test_mean_equals_sum_over_count(gen):
    h, w, t, b, tw = make_inputs(gen, 61, 16, 45, torch.float64, ignore_frac=0.3)
    kw = dict(label_smoothing=0.2, z_loss=1e-3)
    s = linear_cross_entropy(h, w, t, reduction="sum", **kw)
    m = linear_cross_entropy(h, w, t, reduction="mean", **kw)
    count = (t != -100).sum()
    assert 0 < count < 61
    torch.testing.assert_close(m, s / count, rtol=1e-13, atol=0)
    tw = torch.rand(61, generator=gen, dtype=torch.float64) + 0.1
    s = linear_cross_entropy(h, w, t, reduction="sum", token_weights=tw, **kw)
    m = linear_cross_entropy(h, w, t, reduction="mean", token_weights=tw, **kw)
    torch.testing.assert_close(m, s / tw[t != -100].sum(), rtol=1e-13, atol=0)


def _gc_inputs(gen, lead=(2, 4), d=5, v=7):
    h, w, t, b, _ = make_inputs(gen, lead, d, v, torch.float64, bias=True)
    t = t.clone()
    t.view(-1)[1] = -100
    tw = (torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    return h, w, t, b, tw


def test_gradcheck_loss_and_lse(gen):
    h, w, t, b, tw = _gc_inputs(gen)
    kw = dict(label_smoothing=0.15, z_loss=0.05, softcap=2.5, logit_scale=1.3, shift=True,
              chunk_bytes=1, return_lse=True)

    def f_none(h, w, b, tw):
        return linear_cross_entropy(h, w, t, b, token_weights=tw, reduction="none", **kw)

    def f_mean(h, w, b, tw):
        return linear_cross_entropy(h, w, t, b, token_weights=tw, **kw)

    assert torch.autograd.gradcheck(f_none, (h, w, b, tw))
    assert torch.autograd.gradcheck(f_mean, (h, w, b, tw))


def test_gradcheck_lse_alone(gen):
    h, w, t, b, _ = _gc_inputs(gen, lead=(6,))

    def lse_only(h, w, b):
        return linear_cross_entropy(h, w, t, b, softcap=3.0, return_lse=True)[1]

    assert torch.autograd.gradcheck(lse_only, (h, w, b))


def test_gradients_flow_through_lse_alone(gen):
    h, w, t, b, _ = make_inputs(gen, (5, 9), 20, 60, torch.float32, bias=True)
    _, lse = linear_cross_entropy(h, w, t, b, logit_scale=0.9, return_lse=True)
    lse.square().sum().backward()
    ref_leaves = [x.detach().double().requires_grad_() for x in (h, w, b)]
    _, lse_ref = oracle(*ref_leaves[:2], t, ref_leaves[2], logit_scale=0.9)
    lse_ref.square().sum().backward()
    for x, r in zip((h, w, b), ref_leaves):
        assert rel_err(x.grad, r.grad) < 1e-5


def test_backend_contract_parts_and_gradcheck(gen):
    """linear_lse_parts directly, incl. the entropy part and temperature (used by later issues)."""
    h, w, t, b, _ = make_inputs(gen, 9, 6, 11, torch.float64, bias=True)
    t = t.clone()
    t[2], t[4] = -100, 11  # outside [0, V): zt = 0
    opts = Options(label_smoothing=0.1, need_entropy=True, temperature=0.7, softcap=2.0,
                   logit_scale=1.4, chunk_bytes=200)
    lse, zt, zsum, pz = torch_impl.linear_lse_parts(h, w, b, t, opts)
    z = 2.0 * torch.tanh(1.4 * (h @ w.T + b) / 2.0) / 0.7
    valid = (t >= 0) & (t < 11)
    exp = [torch.logsumexp(z, -1), torch.where(valid, z.gather(1, t.clamp(0, 10)[:, None])[:, 0], 0.0),
           z.sum(-1), (z.softmax(-1) * z).sum(-1)]
    for a, r in zip((lse, zt, zsum, pz), exp):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w, b: tuple(torch_impl.linear_lse_parts(h, w, b, t, opts)),
                                    (h, w, b))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nan_row_poisons_only_that_row(gen, reduction):
    h, w, t, b, tw = make_inputs(gen, 20, 12, 31, bias=True, token_weights=True)
    h = h.detach().clone()
    h[7, 3] = float("nan")
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, t, b, token_weights=tw, reduction="none",
                                label_smoothing=0.1, z_loss=1e-3)
    assert torch.isnan(loss[7]) and torch.isfinite(loss[torch.arange(20) != 7]).all()
    clean = linear_cross_entropy(h[torch.arange(20) != 7], w, t[torch.arange(20) != 7], b,
                                 token_weights=tw[torch.arange(20) != 7], reduction="none",
                                 label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(loss[torch.arange(20) != 7], clean, rtol=0, atol=0)
    loss.sum().backward()
    assert torch.isfinite(h.grad[torch.arange(20) != 7]).all()
    if reduction != "none":
        red = linear_cross_entropy(h, w, t, b, reduction=reduction)
        assert torch.isnan(red)


def test_ignored_rows_give_zero_even_with_nan_hidden(gen):
    h, w, t, b, tw = make_inputs(gen, 20, 12, 31, bias=True, token_weights=True)
    h = h.detach().clone()
    t = t.clone()
    h[[2, 11]] = float("nan")
    h[5] = float("inf")
    t[[2, 5, 11]] = -100
    kw = dict(bias=b, token_weights=tw, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    none = linear_cross_entropy(h, w, t, reduction="none", **kw)
    assert (none[[2, 5, 11]] == 0).all() and torch.isfinite(none).all()
    for reduction in ("mean", "sum"):
        assert torch.isfinite(linear_cross_entropy(h, w, t, reduction=reduction, **kw))
    keep = t != -100
    mean = linear_cross_entropy(h, w, t, **kw)
    ref = linear_cross_entropy(h[keep], w, t[keep], b, token_weights=tw[keep], label_smoothing=0.1,
                               z_loss=1e-3, softcap=4.0)
    torch.testing.assert_close(mean, ref)


def test_all_ignored_mean_is_zero_with_zero_grads(gen):
    h, w, t, b, tw = make_inputs(gen, (3, 5), 12, 31, bias=True, token_weights=True)
    t = torch.full_like(t, -100)
    for reduction in ("mean", "sum", "none"):
        for p in (h, w, b):
            p.grad = None
        loss = linear_cross_entropy(h, w, t, b, token_weights=tw, reduction=reduction, z_loss=1e-2,
                                    label_smoothing=0.1)
        assert not loss.any() and torch.isfinite(loss).all()
        loss.sum().backward()
        for p in (h, w, b):
            assert p.grad is not None and torch.isfinite(p.grad).all() and not p.grad.any()


def test_int32_targets_equal_int64(gen):
    h, w, t, b, tw = make_inputs(gen, (4, 6), 10, 40, torch.float64, ignore_frac=0.2)
    a = linear_cross_entropy(h, w, t.int(), reduction="none", return_lse=True)
    r = linear_cross_entropy(h, w, t, reduction="none", return_lse=True)
    for x, y in zip(a, r):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_grads_only_where_required(gen):
    h, w, t, b, _ = make_inputs(gen, 10, 8, 21, requires_grad=False, bias=True)
    for need in ("h", "w", "b"):
        leaves = {k: x.clone().requires_grad_(k == need) for k, x in zip("hwb", (h, w, b))}
        loss = linear_cross_entropy(leaves["h"], leaves["w"], t, leaves["b"], softcap=3.0)
        loss.backward()
        for k, x in leaves.items():
            assert (x.grad is not None) == (k == need)
        ref = [x.double().requires_grad_(k == need) for k, x in zip("hwb", (h, w, b))]
        r, _ = oracle(ref[0], ref[1], t, ref[2], softcap=3.0)
        r.backward()
        assert rel_err(leaves[need].grad, ref["hwb".index(need)].grad) < 1e-5
    with torch.no_grad():
        assert torch.isfinite(linear_cross_entropy(h, w, t, b))


def test_non_contiguous_inputs(gen):
    h, w, t, b, tw = make_inputs(gen, (6, 9), 16, 33, torch.float64, bias=True, token_weights=True,
                                 requires_grad=False)
    hn = torch.cat([h, h], -1)[..., ::2].transpose(0, 1)  # strided, transposed
    wn = w.T.contiguous().T  # column-major
    bn = torch.stack([b, b], 1)[:, 0]
    tn, twn = t.T, tw.T
    assert not (hn.is_contiguous() or wn.is_contiguous() or bn.is_contiguous() or tn.is_contiguous())
    for shift in (False, True):
        a = linear_cross_entropy(hn, wn, tn, bn, token_weights=twn, reduction="none", shift=shift)
        r = linear_cross_entropy(hn.contiguous(), w, tn.contiguous(), b,
                                 token_weights=twn.contiguous(), reduction="none", shift=shift)
        torch.testing.assert_close(a, r, rtol=1e-13, atol=1e-13)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.max_numel = max(self.max_numel, x.numel())
        return out


def test_no_n_by_v_tensor_in_forward_or_backward(gen):
    n, d, v = 256, 8, 97
    h, w, t, b, tw = make_inputs(gen, n, d, v, bias=True, token_weights=True)
    rows = 4
    chunk_bytes = rows * v * 4 * torch_impl._TEMPS_PER_CHUNK
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0, chunk_bytes=chunk_bytes)
    saved = []
    with _MaxNumel() as mode, torch.autograd.graph.saved_tensors_hooks(
            lambda x: saved.append(x.numel()) or x, lambda x: x):
        loss, lse = linear_cross_entropy(h, w, t, b, token_weights=tw, return_lse=True, **kw)
        (loss + lse.sum()).backward()
    # the largest tensors are the inputs and their gradients (N x D, V x D) and a chunk of logits
    assert mode.max_numel <= max(v * d, n * d, rows * v) < n * v // 8
    assert max(saved) <= max(v * d, n * d)
