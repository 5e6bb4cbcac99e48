"""linear_log_probs: per-token log-probabilities and entropy against float64 materialized logits."""

from __future__ import annotations


import torch

import pytest  # noqa: E402

import cutce  # noqa: E402
from reference import make_inputs, rel_err  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _oracle(h, w, t, b, temperature, softcap, logit_scale, shift, ignore_index=-100):
    if shift:
        h, t = h[..., :-1, :], t[..., 1:]
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    z = z * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = z.log_softmax(-1)
    valid = t != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, t, 0)[..., None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float64), ("torch", torch.float32),
                                        ("triton", torch.float32), ("triton", torch.bfloat16)])
@pytest.mark.parametrize("opts", [dict(temperature=1.0, softcap=None, logit_scale=1.0, shift=False),
                                  dict(temperature=0.7, softcap=4.0, logit_scale=1.3, shift=True)])
def test_log_probs_and_entropy(gen, impl, dtype, opts):
    if impl == "triton":
        pytest.importorskip("triton")
    h, w, t, b, _ = make_inputs(gen, (2, 19), 24, 131, dtype, bias=True, ignore_frac=0.2)
    h, w, b = [x.detach().to(DEV).requires_grad_() for x in (h, w, b)]
    t = t.to(DEV)
    logp, ent = cutce.linear_log_probs(h, w, t, b, return_entropy=True, impl=impl, **opts)
    g1, g2 = torch.randn_like(logp), torch.randn_like(ent)
    got = [logp, ent, *torch.autograd.grad((logp * g1 + ent * g2).sum(), (h, w, b))]
    h64, w64, b64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
    rlogp, rent = _oracle(h64, w64, t, b64, **opts)
    want = [rlogp, rent, *torch.autograd.grad((rlogp * g1.double() + rent * g2.double()).sum(),
                                               (h64, w64, b64))]
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1.5e-2}[dtype]
    for name, a, r in zip(("logp", "entropy", "dE", "dC", "dbias"), got, want):
        assert torch.isfinite(a).all()
        assert rel_err(a, r) < tol, name
    ignored = (t[..., 1:] if opts["shift"] else t) == -100
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()


def test_log_probs_validation():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="temperature: expected"):
        cutce.linear_log_probs(h, w, torch.zeros(4, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="tokens: expected"):
        cutce.linear_log_probs(h, w, torch.full((4,), 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need", ["both", "hidden", "weight"])
def test_recompute_chunks_of_the_budget(gen, monkeypatch, dtype, need):
    """The recompute backward's chunks when the budget holds them (several token and vocabulary
    chunks at the interpreter's chunk size, a whole float32 dE per token chunk): the gradients
    of log-probs and entropy match float64, nothing left unwritten (poisoned workspaces)."""
    pytest.importorskip("triton")
    from cutce.backends.triton import backward, configs
    from cutce.engine import planner

    monkeypatch.setattr(planner, "recompute_spare_bytes", lambda p: 2**40)
    monkeypatch.setattr(backward, "workspace_chunks",
                        lambda *a, **k: pytest.fail("not the budget's chunks"))
    calls = []
    run = backward.backward
    monkeypatch.setattr(backward, "backward", lambda *a, **k: calls.append(1) or run(*a, **k))
    # 13 features: N x V logits far beyond the budget, so the forward does not keep them
    h, w, t, _, _ = make_inputs(gen, (2, 126), 13, 507, dtype, ignore_frac=0.2)
    h, w = h.detach().to(DEV).requires_grad_(need != "weight"), w.detach().to(DEV).requires_grad_(need != "hidden")
    t = t.to(DEV)
    with configs.override(poison=True):
        logp, ent = cutce.linear_log_probs(h, w, t, return_entropy=True, impl="triton", temperature=0.8)
        g1, g2 = torch.randn_like(logp), torch.randn_like(ent)
        leaves = [x for x in (h, w) if x.requires_grad]
        got = torch.autograd.grad((logp * g1 + ent * g2).sum(), leaves)
    h64, w64 = [x.detach().double().requires_grad_(x.requires_grad) for x in (h, w)]
    rlogp, rent = _oracle(h64, w64, t, None, 0.8, None, 1.0, False)
    want = torch.autograd.grad((rlogp * g1.double() + rent * g2.double()).sum(),
                               [x for x in (h64, w64) if x.requires_grad])
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}[dtype]
    assert calls  # the recompute backward ran (not the kept logits')
    for a, r in zip(got, want):
        assert torch.isfinite(a).all() and rel_err(a, r) < tol
