"""Distillation inputs and the oracle check shared by the distillation tests."""

from __future__ import annotations

import torch

import cutce
from reference import distill_reference, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def to_dev(dev, tensors):
    out = [None if x is None else x.detach().to(dev).requires_grad_(x.requires_grad)
           if x.is_floating_point() else x.to(dev) for x in tensors]
    return tuple(out)


def make(gen, lead=(37,), ds=29, dt=45, v=101, dtype=torch.float32, *, bias=False,
         teacher_grad=False, ignore_frac=0.2, targets=True, teacher_dtype=None):
    """Student (hs, ws, bs), teacher (ht, wt, bt) leaves and targets; logits of std ~2-3."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    tdt = teacher_dtype or dtype

    def leaf(x, dt_, grad):
        return None if x is None else x.to(dt_).requires_grad_(grad)

    hs = leaf(torch.randn(*lead, ds, generator=gen), dtype, True)
    ws = leaf(torch.randn(v, ds, generator=gen) * (2.0 / ds**0.5), dtype, True)
    ht = leaf(torch.randn(*lead, dt, generator=gen), tdt, teacher_grad)
    wt = leaf(torch.randn(v, dt, generator=gen) * (3.0 / dt**0.5), tdt, teacher_grad)
    bs = leaf(torch.randn(v, generator=gen), dtype, True) if bias else None
    bt = leaf(torch.randn(v, generator=gen), tdt, teacher_grad) if bias else None
    t = None
    if targets:
        t = torch.randint(0, v, lead, generator=gen)
        t = torch.where(torch.rand(lead, generator=gen) < ignore_frac, torch.full_like(t, -100), t)
    return hs, ws, bs, ht, wt, bt, t


def check(gen, tensors, dtype, impl="torch", **opts):
    """cutce and the oracle: loss and the gradients of every tensor that requires grad."""
    hs, ws, bs, ht, wt, bt, t = tensors
    out = cutce.linear_distillation_loss(hs, ws, ht, wt, t, student_bias=bs, teacher_bias=bt,
                                         impl=impl, **opts)
    ref = distill_reference(hs, ws, ht, wt, t, bs=bs, bt=bt,
                            **{k: x for k, x in opts.items() if k != "memory_budget"})
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    leaves = [x for x in (hs, ws, bs, ht, wt, bt) if x is not None and x.requires_grad]
    got = torch.autograd.grad((out.double() * g).sum(), leaves)
    want = torch.autograd.grad((ref * g).sum(), leaves)
    tol = TOL[dtype]
    assert rel_err(out, ref) < tol, (out, ref)
    for i, (a, r) in enumerate(zip(got, want)):
        assert a.dtype == leaves[i].dtype and torch.isfinite(a).all()
        assert rel_err(a, r) < tol, f"grad {i}: {rel_err(a, r)}"
    return out
