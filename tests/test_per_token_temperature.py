"""linear_log_probs with a tensor of per-token temperatures, against float64 materialized logits.

z_ij / T_i, written out here; values and gradients (w.r.t. hidden, weight, bias) on the torch
path and, through Triton's interpreter on CPU, the Triton kernels (float32 and float16 at tiny
ragged shapes; the keep strategy and the recompute one); the statistics; a tensor of equal
temperatures against the float; the inputs that raise. The vocabulary-parallel case runs in
tests/test_distributed.py's workers.
"""

from __future__ import annotations

import pytest
import torch

import cutce
from reference import rel_err
from triton_support import DEV, HAS_TRITON

LEAD, D, V = (3, 13), 23, 61  # 39 tokens (36 scored with shift)
BIG = 1e4  # a memory budget that holds every logit of these shapes: the keep strategy


def _triton_runs():
    if not HAS_TRITON:
        return False
    from cutce.backends import triton_reason
    return triton_reason(torch.empty(0, device=DEV)) is None


needs_triton = pytest.mark.skipif(not _triton_runs(), reason="the Triton backend cannot run here")


def _inputs(gen, dtype, lead=LEAD, bias=True):
    h = torch.randn(*lead, D, generator=gen)
    w = torch.randn(V, D, generator=gen) * (2.5 / D**0.5)
    b = torch.randn(V, generator=gen) if bias else None
    t = torch.randint(0, V, lead, generator=gen)
    t = torch.where(torch.rand(lead, generator=gen) < 0.2, -100, t)
    temp = torch.rand(lead, generator=gen, dtype=torch.float64) * 1.7 + 0.3  # in [0.3, 2.0]
    temp = torch.where(t == -100, 0.0, temp)  # ignored positions' temperatures are not read
    leaves = [None if x is None else x.to(dtype).to(DEV).requires_grad_() for x in (h, w, b)]
    return (*leaves, t.to(DEV), temp.to(DEV))


def _reference(h, w, t, b, temp, softcap=None, logit_scale=1.0, shift=False):
    """(logp, entropy, is_top1, mean_logits, log_sum_sq_probs) from the (N, V) float64 logits."""
    if shift:
        h, t, temp = h[..., :-1, :], t[..., 1:], temp[..., 1:]
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    z = z * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = t != -100
    z = z / torch.where(valid, temp.double(), 1.0)[..., None]
    lsm = z.log_softmax(-1)
    logp = lsm.gather(-1, torch.where(valid, t, 0)[..., None])[..., 0]
    ent = -(lsm.exp() * lsm).sum(-1)
    top1 = (z.argmax(-1) == t) & valid
    lss = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
    return tuple(torch.where(valid, x, 0.0) for x in (logp, ent)) + (
        top1, *(torch.where(valid, x, 0.0) for x in (z.mean(-1), lss)))


def _check(gen, impl, dtype, tol, softcap=None, scale=1.0, shift=False, bias=True, stats=False,
           **kw):
    h, w, b, t, temp = _inputs(gen, dtype, bias=bias)
    opts = dict(softcap=softcap, logit_scale=scale, shift=shift)
    out = cutce.linear_log_probs(h, w, t, b, temperature=temp.to(dtype), impl=impl,
                                 return_entropy=True, return_stats=stats, **opts, **kw)
    leaves = [x for x in (h, w, b) if x is not None]
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    h64, w64, b64 = ref_leaves + [None] * (3 - len(ref_leaves))
    want = _reference(h64, w64, t, b64, temp.to(dtype), **opts)
    g1, g2 = (torch.randn(want[0].shape, generator=gen, dtype=torch.float64).to(want[0].device)
              for _ in range(2))
    got_g = torch.autograd.grad((out[0].double() * g1 + out[1].double() * g2).sum(), leaves)
    want_g = torch.autograd.grad((want[0] * g1 + want[1] * g2).sum(), ref_leaves)
    names = ("logp", "entropy", "dE", "dC", "dbias")
    for name, a, r in zip(names, (out[0], out[1], *got_g), (want[0], want[1], *want_g)):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) < tol, (name, rel_err(a, r))
    if stats:
        assert torch.equal(out.is_top1, want[2])
        for name, a, r in zip(("mean_logits", "log_sum_sq_probs"), out[3:], want[3:]):
            assert rel_err(a, r) < tol, (name, rel_err(a, r))
    return out


TORCH_CASES = [
    dict(),
    dict(softcap=4.0, scale=1.3, shift=True),
    dict(bias=False, shift=True, stats=True),
    dict(softcap=3.0, stats=True, memory_budget=0, chunk_rows=True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", range(len(TORCH_CASES)))
def test_torch_path(gen, monkeypatch, dtype, case):
    kw = dict(TORCH_CASES[case])
    if kw.pop("chunk_rows", False):  # several chunks of tokens: each takes its own rows' 1 / T
        from cutce.backends.pytorch import ce
        monkeypatch.setattr(ce, "chunk_rows", lambda *a: 5)
    _check(gen, "torch", dtype, 1e-10 if dtype == torch.float64 else 1e-5, **kw)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("budget", [BIG, 0])
@pytest.mark.parametrize("case", [dict(softcap=4.0, scale=1.3, shift=True),
                                  dict(bias=False, stats=True)])
def test_triton_kernels(gen, monkeypatch, poisoned, dtype, budget, case):
    """Both backward strategies (a budget that keeps the logits, and memory_budget=0), every
    launcher buffer NaN-poisoned."""
    from cutce.backends.triton import kept
    calls = []
    real = kept.backward
    monkeypatch.setattr(kept, "backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    if budget == BIG and dtype == torch.float16:
        # the kept logits are rounded to float16 before the backward's softmax, and 1 / T up to
        # 3.3 scales that rounding: test_kept_logits's bound for the keep strategy at tiny shapes
        # (on an H100 these cases reach 7e-3; at real shapes the benchmark's errors are within
        # PyTorch's own, see benchmarks/results/log_probs_cuda_h100*.json)
        tol = 3e-2
    _check(gen, "triton", dtype, tol, memory_budget=budget, **case)
    assert len(calls) == (budget == BIG)


@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if _triton_runs() else []))
def test_equal_temperatures_equal_the_float(gen, impl):
    h, w, b, t, _ = _inputs(gen, torch.float32)
    kw = dict(softcap=4.0, shift=True, impl=impl, return_stats=True)
    want = cutce.linear_log_probs(h, w, t, b, temperature=0.7, **kw)
    got = cutce.linear_log_probs(h, w, t, b, temperature=torch.full(t.shape, 0.7, device=DEV), **kw)
    # equal up to the rounding of 1 / 0.7 (a float32 tensor against a Python float)
    assert torch.equal(got.is_top1, want.is_top1)
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=2e-6, atol=2e-6)
    g = [torch.autograd.grad(o.log_probs.sum() + o.entropy.sum(), (h, w, b)) for o in (got, want)]
    for a, r in zip(*g):
        torch.testing.assert_close(a, r, rtol=2e-5, atol=2e-6)


def test_float_path_unchanged(gen):
    """A float temperature reaches the backends as before (no per-row tensor, Options carries
    it); a tensor one leaves Options.temperature at 1."""
    from cutce.backends.pytorch import ce
    seen = []
    real = ce.linear_lse_parts

    def spy(*a, **k):
        seen.append((a[4].temperature, k.get("inv_temp")))
        return real(*a, **k)

    h, w, b, t, temp = _inputs(gen, torch.float64)
    try:
        ce.linear_lse_parts = spy
        cutce.linear_log_probs(h, w, t, b, temperature=0.7, impl="torch")
        cutce.linear_log_probs(h, w, t, b, temperature=temp, impl="torch")
    finally:
        ce.linear_lse_parts = real
    assert seen[0] == (0.7, None)
    assert seen[1][0] == 1.0 and seen[1][1].shape == (t.numel(),)


def test_ignored_positions_are_not_read(gen):
    """0, inf or NaN temperatures where tokens == ignore_index change nothing and keep the
    gradients finite."""
    h, w, b, t, temp = _inputs(gen, torch.float64)
    ignored = t == -100
    assert ignored.any()
    a = cutce.linear_log_probs(h, w, t, b, temperature=temp, return_entropy=True, impl="torch")
    for fill in (float("nan"), float("inf"), -1.0):
        bad = torch.where(ignored, fill, temp)
        c = cutce.linear_log_probs(h, w, t, b, temperature=bad, return_entropy=True, impl="torch")
        assert all(torch.equal(x, y) for x, y in zip(a, c))
        grads = torch.autograd.grad(c[0].sum() + c[1].sum(), (h, w, b))
        assert all(torch.isfinite(g).all() for g in grads)


def _bad(h, w, t, temperature, match, **kw):
    with pytest.raises(ValueError, match=match):
        cutce.linear_log_probs(h, w, t, temperature=temperature, impl="torch", **kw)


def test_bad_temperatures():
    h, w = torch.randn(2, 5, 8), torch.randn(11, 8)
    t = torch.randint(0, 11, (2, 5))
    ok = torch.ones(2, 5)
    _bad(h, w, t, ok[:, :4], r"temperature: expected tokens' shape \(2, 5\), got \(2, 4\)")
    _bad(h, w, t, ok[:, 1:], r"temperature: expected tokens' shape \(2, 5\), got \(2, 4\)",
         shift=True)
    _bad(h, w, t, torch.ones(2, 5, dtype=torch.int64),
         r"temperature: expected None or a float tensor, got torch.int64")
    _bad(h, w, t, ok.clone().requires_grad_(),
         r"temperature: expected a tensor that does not require grad .*, got requires_grad=True")
    _bad(h, w, t, ok.to("meta"), r"temperature device: expected hidden's device cpu, got meta")
    for value in (0.0, -0.5, float("inf"), float("nan"), 1e-40):  # 1e-40: 1 / T overflows
        scored = ok.clone()
        scored[1, 3] = value
        _bad(h, w, t, scored, rf"temperature: expected finite values > 0 with a finite inverse "
             rf"in torch.float32 where tokens != ignore_index, got {scored[1, 3].item()}")
    shifted_out = ok.clone()
    shifted_out[:, 0] = 0.0  # position 0 scores nothing with shift: not read
    cutce.linear_log_probs(h, w, t, temperature=shifted_out, shift=True, impl="torch")
    _bad(h, w, t, shifted_out, "temperature: expected finite values > 0")
    _bad(h, w, t, "hot", r"temperature: expected a finite number, got 'hot'")


def test_compiled_call(gen):
    """Under torch.compile (aot_eager) the per-token temperatures are a graph input like tokens."""
    h, w, b, t, temp = _inputs(gen, torch.float32)

    def f(h, w, t, b, temp):
        return cutce.linear_log_probs(h, w, t, b, temperature=temp, impl="torch", shift=True)

    want = f(h, w, t, b, temp)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(h, w, t, b, temp)
    torch.testing.assert_close(got, want)


def test_custom_ops_opcheck(gen):
    """The ops' schemas, fake implementations and autograd with a per-row tensor."""
    from cutce.backends.pytorch import ce
    h, w, b, t, _ = _inputs(gen, torch.float32, lead=(9,))
    inv = torch.rand(9, generator=gen).to(DEV) + 0.5
    cfg = ce._Cfg(1.3, 4.0, 1.0, True, True, None, True)
    torch.library.opcheck(torch.ops.cutce.torch_lse_parts, (h, w, b, t, None, inv, *cfg))
    if _triton_runs():
        torch.library.opcheck(torch.ops.cutce.lse_parts, (h, w, b, t, None, inv, 1.3, 4.0, 1.0,
                                                          True, True, 0.0, None, [], False,
                                                          True))


def test_truncation_with_per_token_temperatures_raises(gen):
    h, w, t, _, _ = _inputs(gen, torch.float32, lead=(5,))
    with pytest.raises(ValueError, match="temperature: expected a float with top_k"):
        cutce.linear_log_probs(h, w, t, temperature=torch.full((5,), 0.7, device=h.device),
                               top_k=3, impl="torch")
