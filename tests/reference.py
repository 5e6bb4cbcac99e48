"""Reference LM-head losses built from MATERIALIZED logits, independent of cutce.

Nothing here imports cutce: these functions spell out the formula of the specification directly
with dense torch ops, so that the tests compare cutce against the definition, not against itself.

``reference`` computes, in ``compute_dtype`` (float64 for the oracle)::

    if shift: hidden = hidden[..., :-1, :]; targets = targets[..., 1:]; w = w[..., 1:]
    z      = logit_scale * (hidden @ weight.T + bias)
    z      = softcap * tanh(z / softcap)    if softcap
    lse    = logsumexp(z, -1)
    loss_i = (1 - ls) * (lse - z[target]) + ls * (lse - mean_v z) + z_loss * lse**2
    loss_i = w_i * loss_i on valid tokens (target != ignore_index), 0 on ignored ones
    "none" -> loss_i (targets' shape after shift); "sum" -> sum_i loss_i
    "mean" -> sum_i loss_i / sum_valid w_i, and 0 when nothing is valid

``logit_dtype`` selects where ``hidden @ weight.T + bias`` is computed: the oracle uses float64
throughout; ``lowp_torch`` is what a PyTorch user writes (logits in the input dtype, e.g. bf16,
then the loss in float32), whose own error against the oracle is the yardstick for cutce's.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def reference(hidden, weight, targets, bias=None, *, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
              token_weights=None, shift=False, logit_dtype=torch.float64,
              compute_dtype=torch.float64):
    """(loss, lse) from dense logits. Differentiable w.r.t. the given tensors (autograd through
    the dtype casts, so gradients land on the caller's tensors in their own dtypes)."""
    if shift:
        hidden, targets = hidden[..., :-1, :], targets[..., 1:]
        if token_weights is not None:
            token_weights = token_weights[..., 1:]
    out_shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1]).to(logit_dtype)
    t = targets.reshape(-1).long()
    logits = h @ weight.to(logit_dtype).T
    if bias is not None:
        logits = logits + bias.to(logit_dtype)
    z = logits.to(compute_dtype) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    valid = t != ignore_index
    z_target = z.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    loss = lse - z_target
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse**2
    if token_weights is None:
        w = valid.to(compute_dtype)
    else:
        w = torch.where(valid, token_weights.reshape(-1).to(compute_dtype), 0.0)
    loss = torch.where(valid, w * loss, 0.0)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    elif reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        denom = w.sum()
        loss = loss.sum() / denom if bool(valid.any()) else loss.sum() * 0.0
    else:
        raise ValueError(reduction)
    return loss, lse.reshape(out_shape)


def oracle(*args, **kwargs):
    """Float64 throughout (the ground truth)."""
    return reference(*args, logit_dtype=torch.float64, compute_dtype=torch.float64, **kwargs)


def lowp_torch(hidden, weight, *args, **kwargs):
    """PyTorch's own path: logits in the input dtype, loss in float32 (float64 for float64)."""
    dt = hidden.dtype
    cdt = torch.float64 if dt == torch.float64 else torch.float32
    return reference(hidden, weight, *args, logit_dtype=dt, compute_dtype=cdt, **kwargs)


def make_inputs(gen, lead, d, v, dtype=torch.float32, *, bias=False, token_weights=False,
                ignore_frac=0.0, ignore_index=-100, logit_std=2.5, requires_grad=True):
    """Random (hidden, weight, targets, bias, token_weights) with logits of std ~ logit_std.

    ``lead`` is the targets' shape; hidden is ``(*lead, d)``; a fraction ``ignore_frac`` of the
    targets is set to ``ignore_index``. Tensors are leaves created in ``dtype``.
    """
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    hidden = torch.randn(*lead, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * (logit_std / d**0.5)
    targets = torch.randint(0, v, lead, generator=gen)
    if ignore_frac:
        drop = torch.rand(lead, generator=gen) < ignore_frac
        targets = torch.where(drop, torch.full_like(targets, ignore_index), targets)
    b = torch.randn(v, generator=gen) if bias else None
    tw = torch.rand(lead, generator=gen) * 1.5 + 0.25 if token_weights else None

    def leaf(x):
        return None if x is None else x.to(dtype).requires_grad_(requires_grad)

    return leaf(hidden), leaf(weight), targets, leaf(b), tw


def rel_err(a, b):
    """||a - b|| / ||b|| in float64 (absolute when b is all zeros)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def distill_reference(hs, ws, ht, wt, targets=None, *, bs=None, bt=None, beta=0.0, temperature=1.0,
                      student_softcap=None, teacher_softcap=None, ignore_index=-100, ce_weight=0.0,
                      reduction="mean", shift=False, dtype=torch.float64, logit_dtype=None,
                      token_weights=None, student_logit_scale=1.0, teacher_logit_scale=1.0):
    """Distillation loss from both heads' dense logits, straight from the definition: p the
    teacher's and q the student's softmax at temperature T, m = beta p + (1 - beta) q,
    D = KL(p||q) (beta 0), KL(q||p) (beta 1), else beta KL(p||m) + (1 - beta) KL(q||m);
    loss = w (1 - ce_weight) D + w ce_weight CE(student at T = 1) on valid tokens (w the token
    weight, 1 without); "mean" divides by the valid tokens' sum of w. Logit scales multiply each
    head's logits before its softcap. ``logit_dtype`` (default ``dtype``): the products' dtype
    (bf16: what a PyTorch user writes). Differentiable w.r.t. every tensor given."""
    if shift:
        hs, ht = hs[..., :-1, :], ht[..., :-1, :]
        targets = None if targets is None else targets[..., 1:]
        token_weights = None if token_weights is None else token_weights[..., 1:]
    out_shape = hs.shape[:-1]

    def logits(h, w, b, scale, cap):
        ld = logit_dtype or dtype
        z = h.reshape(-1, h.shape[-1]).to(ld) @ w.to(ld).T
        if b is not None:
            z = z + b.to(ld)
        z = scale * z.to(dtype)
        return z if cap is None else cap * torch.tanh(z / cap)

    zs = logits(hs, ws, bs, student_logit_scale, student_softcap)
    zt = logits(ht, wt, bt, teacher_logit_scale, teacher_softcap)
    q, p = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if beta == 0.0:
        d = kl(p, q)
    elif beta == 1.0:
        d = kl(q, p)
    else:
        m = beta * p + (1.0 - beta) * q
        d = beta * kl(p, m) + (1.0 - beta) * kl(q, m)
    if targets is None:
        valid = torch.ones(d.shape, dtype=torch.bool, device=d.device)
        loss = d
    else:
        t = targets.reshape(-1)
        valid = t != ignore_index
        ce = torch.logsumexp(zs, -1) - zs.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
        loss = (1.0 - ce_weight) * d + ce_weight * ce
    w = torch.ones_like(d) if token_weights is None else token_weights.reshape(-1).to(dtype)
    loss = torch.where(valid, w * loss, 0.0)
    if reduction == "none":
        return loss.reshape(out_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w[valid].sum() if bool(valid.any()) else loss.sum() * 0.0
