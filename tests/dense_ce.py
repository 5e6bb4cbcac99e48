"""Float64 references from MATERIALIZED logits for the randomized and regression tests.

Not a test module, and independent of cutce: each function writes the documented definition
with dense torch ops (log_softmax of the full N x V logits), so that the tests compare cutce
against the definition. Every option of linear_cross_entropy that changes the value is here:
class weights, label smoothing, z-loss, token weights, ignore_index, softcap, logit_scale, bias.
"""

from __future__ import annotations

import torch


def logits(h, w, b=None, *, logit_scale=1.0, softcap=None, temperature=1.0):
    """z = softcap * tanh(logit_scale * (h @ w.T + b) / softcap) / temperature, float64."""
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def cross_entropy(h, w, t, b=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None, logit_scale=1.0, token_weights=None,
                  class_weight=None):
    """(loss, lse) as documented on cutce.linear_cross_entropy (float64, h (N, D), t (N,))."""
    z = logits(h, w, b, logit_scale=logit_scale, softcap=softcap)
    n, v = z.shape
    logp = torch.log_softmax(z, dim=1)
    lse = torch.logsumexp(z, dim=1)
    valid = t != ignore_index
    tc = torch.where(valid & (t >= 0) & (t < v), t, 0)
    c = torch.ones(v, dtype=z.dtype) if class_weight is None else class_weight.double()
    nll_t = -logp.gather(1, tc[:, None])[:, 0]
    smooth = -(logp * c).sum(dim=1) / v  # = (sum(c) lse - (z * c).sum) / V
    ls = label_smoothing
    loss = (1.0 - ls) * c[tc] * nll_t + ls * smooth + z_loss * lse.square()
    w = torch.ones(n, dtype=z.dtype) if token_weights is None else token_weights.double()
    w = torch.where(valid, w, 0.0)
    loss = torch.where(valid, w * loss, 0.0)
    if reduction == "none":
        return loss, lse
    if reduction == "sum":
        return loss.sum(), lse
    denom = (w * torch.where(valid, c[tc], 0.0)).sum()
    if not bool(valid.any()):
        return loss.sum() * 0.0, lse  # documented: nothing valid gives 0
    if float(denom) == 0.0:
        return loss.sum() * torch.nan, lse  # 0/0 as F.cross_entropy
    return loss.sum() / denom, lse


def log_probs(h, w, t, b=None, *, temperature=1.0, softcap=None, logit_scale=1.0,
              ignore_index=-100):
    """(logp, entropy) as documented on cutce.linear_log_probs (0 where t == ignore_index)."""
    z = logits(h, w, b, logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    logp_all = torch.log_softmax(z, dim=1)
    valid = t != ignore_index
    lp = logp_all.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(dim=1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)
