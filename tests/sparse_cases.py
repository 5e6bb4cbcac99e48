"""The sparse distillation tests' inputs and float64 reference (a helper, not a test module):
a teacher's real top-K made ragged (padding with ignore_index at random columns, NaN log-probs
there, one token with no id), and the function's documented expression from materialized logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import cutce
from triton_support import DEV

F64 = torch.float64
D, V = 53, 211
IGNORE = -100



def reference(h, w, ids, lp, targets=None, *, bias=None, tail="drop", temperature=1.0,
              softcap=None, logit_scale=1.0, ignore_index=IGNORE, ce_weight=0.0,
              reduction="mean", shift=False, token_weights=None, **_):
    """The loss from the student's dense float64 logits, computed on the tokens that count only
    (so that a token without ids cannot put a NaN into a gradient)."""
    if shift:
        h, ids, lp = h[..., :-1, :], ids[..., :-1, :], lp[..., :-1, :]
        targets = None if targets is None else targets[..., 1:]
        token_weights = None if token_weights is None else token_weights[..., 1:]
    lead, k = h.shape[:-1], ids.shape[-1]
    ids, lp = ids.reshape(-1, k).long(), lp.reshape(-1, k).to(F64)
    z = h.reshape(-1, h.shape[-1]).to(F64) @ w.to(F64).T
    if bias is not None:
        z = z + bias.to(F64)
    z = logit_scale * z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    pad = ids == ignore_index
    valid = (~pad).any(-1)
    if targets is not None:
        t = targets.reshape(-1).long()
        valid = valid & (t != ignore_index)
    rows = valid.nonzero()[:, 0]
    zv, padv = z[rows], pad[rows]
    lpv = lp[rows].masked_fill(padv, 0.0)
    lq = torch.log_softmax(zv / temperature, -1).gather(1, ids[rows].masked_fill(padv, 0))
    p = lpv.exp().masked_fill(padv, 0.0)
    mass = p.sum(-1)

    def kl(p, lp, lq):
        return torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)

    if tail == "drop":
        d = kl(p, lpv, lq)
    elif tail == "renormalize":
        lqk = lq - torch.logsumexp(lq.masked_fill(padv, -math.inf), -1, keepdim=True)
        d = kl(p / mass[:, None], lpv - mass.log()[:, None], lqk)
    else:
        r = (1.0 - mass).clamp(min=0.0)
        q_mass = lq.exp().masked_fill(padv, 0.0).sum(-1)
        d = kl(p, lpv, lq) + torch.where(r > 0, r * (r.log() - torch.log(1.0 - q_mass)), 0.0)
    loss = (1.0 - ce_weight) * d
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(zv, t[rows], reduction="none")
    n = ids.shape[0]
    wt = (torch.ones(n, dtype=F64, device=z.device) if token_weights is None
          else token_weights.reshape(-1).to(F64))
    out = torch.zeros(n, dtype=F64, device=z.device).index_put((rows,), wt[rows] * loss)
    if reduction == "none":
        return out.reshape(lead)
    if reduction == "sum":
        return out.sum()
    return out.sum() / wt[valid].sum() if bool(valid.any()) else out.sum() * 0.0


def make(gen, lead, k, dtype=F64, *, bias=True, lp_grad=False, ignore_frac=0.2):
    """Leaves (hidden, weight, bias), a teacher's top-k (ids, log-probs) made ragged, targets."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    h = torch.randn(*lead, D, generator=gen, dtype=F64)
    w = torch.randn(V, D, generator=gen, dtype=F64) * (2.5 / D**0.5)
    b = torch.randn(V, generator=gen, dtype=F64) if bias else None
    teacher = (torch.randn(*lead, V, generator=gen, dtype=F64) * 3.0).log_softmax(-1)
    lp, ids = teacher.topk(k, dim=-1)
    keep = torch.randint(1, k + 1, (*lead, 1), generator=gen)
    pad = torch.arange(k) >= keep  # a ragged length per token ...
    pad.view(-1, k)[3] = True  # ... and a token with no id
    cols = torch.rand(*lead, k, generator=gen).argsort(-1)  # padding at any column
    ids = torch.where(pad, IGNORE, ids).gather(-1, cols)
    lp = torch.where(pad, math.nan, lp).gather(-1, cols)
    t = torch.randint(0, V, lead, generator=gen)
    t = torch.where(torch.rand(lead, generator=gen) < ignore_frac, IGNORE, t)
    t.view(-1)[[1, 6]] = IGNORE
    t.view(-1)[-1] = 7

    def leaf(x, grad=True):
        return None if x is None else x.to(dtype).to(DEV).requires_grad_(grad)

    return leaf(h), leaf(w), leaf(b), ids.to(DEV), leaf(lp, lp_grad), t.to(DEV)


def weights(gen, lead, dtype, grad=False):
    """Fresh token weights in [0.25, 1.75) (never zero), a leaf."""
    return (torch.rand(lead, generator=gen) * 1.5 + 0.25).to(dtype).to(DEV).requires_grad_(grad)


def values(out, leaves, g):
    """(out, d(out . g)/d leaf for each leaf) as float64 (zeros for a leaf the loss does not
    use: the teacher's log-probs at ce_weight=1)."""
    grads = torch.autograd.grad((out.double() * g).sum(), leaves, allow_unused=True)
    return [out.detach().double()] + [torch.zeros_like(x, dtype=F64) if d is None else d.double()
                                      for x, d in zip(leaves, grads)]


def as_f64(x):
    if x is None or not x.is_floating_point():
        return x
    return x.detach().to(F64).requires_grad_(x.requires_grad)


def run(impl, tensors, tw, opts):
    h, w, b, ids, lp, t = tensors
    return cutce.linear_sparse_distillation_loss(
        h, w, ids, lp, t if opts.get("with_targets", True) else None, bias=b, token_weights=tw,
        impl=impl, **{k: v for k, v in opts.items() if k != "with_targets"})


def run_reference(tensors, tw, opts):
    h, w, b, ids, lp, t = tensors
    return reference(h, w, ids, lp, t if opts.get("with_targets", True) else None, bias=b,
                     token_weights=tw, **opts)
