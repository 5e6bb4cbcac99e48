"""Every combination of requires_grad over hidden / weight / bias, and torch.no_grad(), on every
path, against float64 autograd.

Frozen heads are the common case of fine-tuning (LoRA/PEFT freeze lm_head; tied embeddings can be
frozen), and a frozen trunk with a training head is how linear probes are trained. On CPU the
Triton path runs through the interpreter; on a GPU the same tests run on CUDA tensors (bf16 too).
"""

from __future__ import annotations

import itertools

import torch

import pytest

import cutce

from reference import lowp_torch, make_inputs, oracle, rel_err
from triton_support import DEV, IMPLS

COMBOS = list(itertools.product((False, True), repeat=3))
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


def _dtypes():
    return [torch.float32, torch.bfloat16] if DEV == "cuda" else [torch.float32]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rg", COMBOS, ids=lambda c: "hwb=" + "".join("1" if x else "0" for x in c))
@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
def test_requires_grad_matrix(gen, impl, rg, dtype):
    h, w, t, b, tw = make_inputs(gen, 45, 24, 70, requires_grad=False, bias=True, ignore_frac=0.2)
    h, w, b = [x.to(DEV, dtype).requires_grad_(r) for x, r in zip((h, w, b), rg)]
    t = t.to(DEV)
    loss, lse = cutce.linear_cross_entropy(h, w, t, b, impl=impl, return_lse=True, z_loss=1e-3)
    assert loss.requires_grad == any(rg)
    params = [x for x, r in zip((h, w, b), rg) if r]

    def ref(fn, hh, ww, bb):
        return fn(hh, ww, t.cpu(), bb, z_loss=1e-3)[0]

    x64 = [x.detach().cpu().double().requires_grad_(r) for x, r in zip((h, w, b), rg)]
    want = ref(oracle, *x64)
    xl = [x.detach().cpu().requires_grad_(r) for x, r in zip((h, w, b), rg)]
    lowp = ref(lowp_torch, *xl)
    tol = rel_err(lowp, want) * 1.5 + FLOOR[dtype]
    assert rel_err(loss.cpu(), want) <= tol
    if not params:
        return
    got = torch.autograd.grad(loss, params)
    want_g = torch.autograd.grad(want, [x for x in x64 if x.requires_grad])
    lowp_g = torch.autograd.grad(lowp, [x for x in xl if x.requires_grad])
    for name, a, lp, ref_g in zip([n for n, r in zip("hwb", rg) if r], got, lowp_g, want_g):
        assert a.dtype == dtype and a.shape == ref_g.shape
        assert torch.isfinite(a).all(), f"d{name} has non-finite entries"
        err, base = rel_err(a.cpu(), ref_g), rel_err(lp, ref_g)
        assert err <= 1.5 * base + FLOOR[dtype], f"d{name}: {err:.3g} vs torch {base:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad(gen, impl):
    h, w, t, b, _ = make_inputs(gen, 33, 24, 70, bias=True)
    h, w, b = [x.detach().to(DEV).requires_grad_() for x in (h, w, b)]
    with torch.no_grad():
        loss = cutce.linear_cross_entropy(h, w, t.to(DEV), b, impl=impl)
        logp, ent = cutce.linear_log_probs(h, w, t.to(DEV), b, impl=impl, return_entropy=True)
    assert not loss.requires_grad and loss.grad_fn is None
    assert not logp.requires_grad and not ent.requires_grad
    want = oracle(h.detach().cpu().double(), w.detach().cpu().double(), t, b.detach().cpu().double())[0]
    assert rel_err(loss.cpu(), want) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rg", [(True, False), (False, True)], ids=["frozen-head", "frozen-hidden"])
def test_log_probs_frozen(gen, impl, rg):
    """Log-probs and entropy (RL) with a frozen head or frozen hidden states."""
    h, w, t, _, _ = make_inputs(gen, 29, 24, 70, requires_grad=False)
    h, w = [x.to(DEV).requires_grad_(r) for x, r in zip((h, w), rg)]
    logp, ent = cutce.linear_log_probs(h, w, t.to(DEV), impl=impl, return_entropy=True)
    (x,) = [x for x, r in zip((h, w), rg) if r]
    (g,) = torch.autograd.grad((logp + 0.1 * ent).sum(), x)
    h64, w64 = [y.detach().cpu().double().requires_grad_(r) for y, r in zip((h, w), rg)]
    lsm = (h64 @ w64.T).log_softmax(-1)
    ref = lsm.gather(1, t[:, None])[:, 0] - 0.1 * (lsm.exp() * lsm).sum(-1)
    (g64,) = torch.autograd.grad(ref.sum(), [y for y in (h64, w64) if y.requires_grad])
    assert rel_err(g.cpu(), g64) < 1e-4
