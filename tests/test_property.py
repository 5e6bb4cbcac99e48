"""Seeded randomized check of every option combination against float64 materialized logits.

Each seed draws a ragged shape (N, D, V not multiples of 16) and a random combination of
options; the loss (and lse), log-probs/entropy and distillation are compared, with their
gradients w.r.t. hidden, weight and bias, against the dense float64 definitions in dense_ce.py
and reference.py. The torch path runs in float64 (tight tolerances), the Triton kernels in
float32 through the interpreter on CPU (relative ~1e-4). Reproduce one case with
``pytest tests/test_property.py -k "torch_ce and 17"``.
"""

from __future__ import annotations

import random

import torch

import pytest  # noqa: E402

import cutce  # noqa: E402
import dense_ce  # noqa: E402
from reference import distill_reference, rel_err  # noqa: E402
from triton_support import DEV, requires_triton  # noqa: E402

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _tensors(rng, n, d, v, dtype, bias):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * (rng.uniform(0.5, 3.0) / d**0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None

    def leaf(x):
        return None if x is None else x.to(DEV, dtype).requires_grad_()

    return leaf(h), leaf(w), leaf(b), g


def _grads(out, leaves):
    return torch.autograd.grad(out, [x for x in leaves if x is not None], allow_unused=True)


def _close(got, want, tol, what):
    if torch.isnan(want).any():
        assert torch.isnan(got).any(), what
        return
    err = rel_err(got.cpu(), want)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


def ce_case(seed, impl):
    rng = random.Random(seed)
    dtype = torch.float64 if impl == "torch" else torch.float32
    n, d, v = rng.randint(1, 40), rng.randint(1, 33), rng.randint(1, 70)
    h, w, b, g = _tensors(rng, n, d, v, dtype, rng.random() < 0.4)
    ignore_index = rng.choice([-100, -100, -1, 0])
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < rng.choice([0.0, 0.2, 0.5])] = ignore_index
    opts = dict(ignore_index=ignore_index, reduction=rng.choice(["mean", "sum", "none"]),
                label_smoothing=rng.choice([0.0, 0.0, 0.1, 0.6]), z_loss=rng.choice([0.0, 1e-2]),
                softcap=rng.choice([None, None, 3.0]), logit_scale=rng.choice([1.0, 0.7, 1.9]))
    tw = torch.rand(n, generator=g, dtype=torch.float64) + 0.25 if rng.random() < 0.3 else None
    cw = None
    if rng.random() < 0.35:
        cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.1
        cw[torch.rand(v, generator=g) < 0.2] = 0.0
    return_lse = rng.random() < 0.3
    budget = rng.choice([0.0, 100.0])
    up = torch.randn(n, generator=g, dtype=torch.float64)  # upstream gradient of "none" and lse
    return dict(h=h, w=w, b=b, t=t, opts=opts, tw=tw, cw=cw, return_lse=return_lse,
                budget=budget, up=up, dtype=dtype)


def _ce_objective(loss, lse, c):
    up = c["up"].to(loss.device, loss.dtype)
    out = (loss * up).sum() if c["opts"]["reduction"] == "none" else loss
    return out + (lse * up.flip(0)).sum() if lse is not None else out


def run_ce(seed, impl):
    c = ce_case(seed, impl)
    h, w, b, t, opts = c["h"], c["w"], c["b"], c["t"], c["opts"]
    leaves = (h, w, b)
    dev = lambda x: None if x is None else x.to(DEV, c["dtype"])  # noqa: E731
    out = cutce.linear_cross_entropy(
        h, w, t.to(DEV), b, token_weights=dev(c["tw"]), class_weight=dev(c["cw"]),
        return_lse=c["return_lse"], memory_budget=c["budget"], impl=impl, **opts)
    loss, lse = out if c["return_lse"] else (out, None)
    got = _grads(_ce_objective(loss, lse, c), leaves)
    ref_leaves = [None if x is None else x.detach().cpu().double().requires_grad_()
                  for x in leaves]
    rloss, rlse = dense_ce.cross_entropy(ref_leaves[0], ref_leaves[1], t, ref_leaves[2],
                                         token_weights=c["tw"], class_weight=c["cw"], **opts)
    want = _grads(_ce_objective(rloss, rlse if c["return_lse"] else None, c), ref_leaves)
    tol = TOL[c["dtype"]]
    what = f"seed {seed} {impl} {opts} tw={c['tw'] is not None} cw={c['cw'] is not None} " \
           f"lse={c['return_lse']} budget={c['budget']} shape={tuple(h.shape)}x{w.shape[0]}"
    _close(loss, rloss, tol, what + " loss")
    if lse is not None:
        _close(lse, rlse, tol, what + " lse")
    for name, gg, ww in zip("hwb", got, want):
        _close(gg, ww, tol, f"{what} grad {name}")


def run_log_probs(seed, impl):
    rng = random.Random(seed)
    dtype = torch.float64 if impl == "torch" else torch.float32
    n, d, v = rng.randint(1, 40), rng.randint(1, 33), rng.randint(1, 70)
    h, w, b, g = _tensors(rng, n, d, v, dtype, rng.random() < 0.4)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.2] = -100
    opts = dict(temperature=rng.choice([1.0, 0.6, 1.7]), softcap=rng.choice([None, 4.0]),
                logit_scale=rng.choice([1.0, 1.3]))
    budget = rng.choice([0.0, 100.0])
    lp, ent = cutce.linear_log_probs(h, w, t.to(DEV), b, return_entropy=True, impl=impl,
                                     memory_budget=budget, **opts)
    u1, u2 = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    got = _grads((lp * u1.to(DEV, dtype)).sum() + (ent * u2.to(DEV, dtype)).sum(), (h, w, b))
    ref = [None if x is None else x.detach().cpu().double().requires_grad_() for x in (h, w, b)]
    rlp, rent = dense_ce.log_probs(ref[0], ref[1], t, ref[2], **opts)
    want = _grads((rlp * u1).sum() + (rent * u2).sum(), ref)
    tol = TOL[dtype]
    what = f"seed {seed} {impl} {opts} shape={(n, d, v)}"
    _close(lp, rlp, tol, what + " logp")
    _close(ent, rent, tol, what + " entropy")
    for name, gg, ww in zip("hwb", got, want):
        _close(gg, ww, tol, f"{what} grad {name}")


def run_distill(seed, impl):
    rng = random.Random(seed)
    dtype = torch.float64 if impl == "torch" else torch.float32
    n, v = rng.randint(1, 30), rng.randint(1, 60)
    ds, dt = rng.randint(1, 33), rng.randint(1, 33)
    hs, ws, bs, g = _tensors(rng, n, ds, v, dtype, rng.random() < 0.4)
    ht, wt, bt, _ = _tensors(rng, n, dt, v, dtype, rng.random() < 0.4)
    teacher_grad = rng.random() < 0.3
    if not teacher_grad:
        ht, wt = ht.detach(), wt.detach()
        bt = None if bt is None else bt.detach()
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.2] = -100
    opts = dict(beta=rng.choice([0.0, 0.5, 1.0]), temperature=rng.choice([1.0, 0.8, 2.0]),
                ce_weight=rng.choice([0.0, 0.0, 0.3]), reduction=rng.choice(["mean", "sum", "none"]),
                student_softcap=rng.choice([None, 5.0]), teacher_softcap=rng.choice([None, 5.0]))
    targets = t if opts["ce_weight"] or rng.random() < 0.7 else None
    budget = rng.choice([0.0, 100.0])
    out = cutce.linear_distillation_loss(hs, ws, ht, wt, None if targets is None else targets.to(DEV),
                                         student_bias=bs, teacher_bias=bt, impl=impl,
                                         memory_budget=budget, **opts)
    up = torch.randn(n, generator=g, dtype=torch.float64)
    leaves = (hs, ws, bs, ht, wt, bt) if teacher_grad else (hs, ws, bs)

    def objective(x, u):
        return (x * u.to(x.device, x.dtype)).sum() if opts["reduction"] == "none" else x

    got = _grads(objective(out, up), leaves)
    full = [None if x is None else x.detach().cpu().double().requires_grad_(x.requires_grad)
            for x in (hs, ws, bs, ht, wt, bt)]
    rout = distill_reference(full[0], full[1], full[3], full[4], targets, bs=full[2], bt=full[5],
                             **opts)
    want = _grads(objective(rout, up), full[:len(leaves)])
    tol = TOL[dtype] * (1 if impl == "torch" else 3)  # two heads' float32 statistics
    what = f"seed {seed} {impl} {opts} targets={targets is not None} budget={budget} " \
           f"teacher_grad={teacher_grad} shape={(n, ds, dt, v)}"
    _close(out, rout, tol, what + " loss")
    for name, gg, ww in zip(["hs", "ws", "bs", "ht", "wt", "bt"], got, want):
        _close(gg, ww, tol, f"{what} grad {name}")


@pytest.mark.parametrize("seed", range(40))
def test_torch_ce(seed):
    run_ce(seed, "torch")


@pytest.mark.parametrize("seed", range(100, 110))
def test_torch_log_probs(seed):
    run_log_probs(seed, "torch")


@pytest.mark.parametrize("seed", range(200, 212))
def test_torch_distill(seed):
    run_distill(seed, "torch")


@requires_triton
@pytest.mark.parametrize("seed", range(300, 320))
def test_triton_ce(seed):
    run_ce(seed, "triton")


@requires_triton
@pytest.mark.parametrize("seed", range(400, 406))
def test_triton_log_probs(seed):
    run_log_probs(seed, "triton")


@requires_triton
@pytest.mark.parametrize("seed", range(500, 508))
def test_triton_distill(seed):
    run_distill(seed, "triton")
