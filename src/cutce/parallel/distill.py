"""Vocabulary-parallel distillation: the exact loss of two heads split by vocabulary rows.

Conventions are :mod:`cutce.parallel.vocab`'s: each rank holds the rows [start, stop) of both
heads' weights and biases (the same split for student and teacher), the hidden states and
targets are the same on every rank, the result is the unsplit one on every rank and its backward
is the gradient of that one replicated loss. Per token i (a = student logits / T, b = teacher
logits / T, s = student logits at T = 1, after each head's softcap)::

    pass 1: lse_a_r, lse_b_r (and lse_s_r, s[target] on the target's owner when ce_weight > 0)
            over this rank's classes; one all-gather of (k, N) -> lse_a, lse_b, lse_s, s[target]
    pass 2: with those global lses, log q = a - lse_a and log p = b - lse_b are exact per class
            (so is log m, the JSD's mixture): this rank's partial sums of D's terms; one
            all-gather of (k, N), summed in rank order -> D (or KL(p||m), KL(q||m)) per token

The derivatives are :mod:`cutce.backends.pytorch.distill`'s: they read only per-class values and
the per-token totals above, so the backward recomputes each chunk's logits, forms this rank's
dC/dbias and a partial dE that :class:`~cutce.parallel.collectives.SumGradAcrossGroup` sums. The
all-gathers (not all-reduces) make every rank sum in the same order: the loss is bitwise the same
on every rank. Never communicated: a weight, its gradient or any logits.
"""

from __future__ import annotations

import collections
import math

import torch
from torch import Tensor

from .collectives import SumGradAcrossGroup, check_replicated, fingerprint, gather
from .split import VocabSlice
from ..backends.pytorch.common import Head, compute_dtype, softcap_
from ..backends.pytorch.distill import chunk_rows
from ..engine.options import Options

__all__ = ["vocab_parallel_distill_rows"]


_Cfg = collections.namedtuple("_Cfg", "beta temperature cap_s cap_t ce_weight")


def _logits(stu, tea, s, e, cfg):
    """A chunk's float logits of both heads after softcap (T = 1) and the softcaps' derivative
    factors (None without a softcap)."""
    ys, yt = stu.logits(s, e), tea.logits(s, e)
    return ys, yt, softcap_(ys, cfg.cap_s), softcap_(yt, cfg.cap_t)


def _log_m(log_q, log_p, beta):
    """The JSD's log m; logaddexp stays finite where p or q underflows."""
    return torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))


def _owned(targets, valid, vs):
    """Rows whose target is this rank's class, and its local column (0 elsewhere), (N, 1)."""
    mine = valid & (targets >= vs.start) & (targets < vs.stop)
    return mine, torch.where(mine, targets - vs.start, 0)[:, None]


class _DistillRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, targets, valid, cfg, vs):
        cdt = compute_dtype(hs.dtype, ht.dtype)
        n = hs.shape[0]
        stu, tea = Head(hs, ws, bs, cdt), Head(ht, wt, bt, cdt)
        step = chunk_rows(n, ws.shape[0], cdt, hs.device)
        ce, div, inv_t = cfg.ce_weight > 0.0, cfg.ce_weight < 1.0, 1.0 / cfg.temperature
        mine, local = _owned(targets, valid, vs)
        # rows: lse_a, lse_b (divergence), lse_s, s[target] (CE), then the replication probes
        part = hs.new_zeros(2 * div + 2 * ce + 2, n, dtype=cdt)
        for s in range(0, n, step):
            e = min(s + step, n)
            ys, yt, _, _ = _logits(stu, tea, s, e, cfg)
            k = 0
            if div:
                part[0, s:e] = torch.logsumexp(ys * inv_t, dim=1)
                part[1, s:e] = torch.logsumexp(yt * inv_t, dim=1)
                k = 2
            if ce:
                part[k, s:e] = torch.logsumexp(ys, dim=1)
                part[k + 1, s:e] = torch.where(mine[s:e], ys.gather(1, local[s:e])[:, 0], 0.0)
        part[-2], part[-1] = fingerprint(hs), fingerprint(ht)
        every = gather(part, vs.group)  # (W, k, N)
        for probe in (-2, -1):
            check_replicated(every[:, probe])
        lse = torch.logsumexp(every[:, :2 * div], dim=0)  # (2, N) or (0, N)
        rows = torch.zeros(n, dtype=cdt, device=hs.device)
        stats = [lse]
        if ce:
            k = 2 * div
            lse_s = torch.logsumexp(every[:, k], dim=0)
            rows += cfg.ce_weight * (lse_s - every[:, k + 1].sum(dim=0))
            stats.append(lse_s[None])
        if div:
            kl = _pass2(stu, tea, lse, step, cfg, vs)
            d = kl[0] if kl.shape[0] == 1 else cfg.beta * kl[0] + (1.0 - cfg.beta) * kl[1]
            rows += (1.0 - cfg.ce_weight) * d
            stats.append(kl)
        rows = torch.where(valid, rows, 0.0)
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, targets, valid, torch.cat(stats))
        ctx.cfg, ctx.vs = cfg, vs
        return rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_rows):
        hs, ws, bs, ht, wt, bt, targets, valid, stats = ctx.saved_tensors
        cfg, vs = ctx.cfg, ctx.vs
        inputs = (hs, ws, bs, ht, wt, bt)
        need = [on and t is not None for on, t in zip(ctx.needs_input_grad[:6], inputs)]
        cdt = stats.dtype
        stu, tea = Head(hs, ws, bs, cdt), Head(ht, wt, bt, cdt)
        grads = [t.new_zeros(t.shape, dtype=cdt) if on else None for t, on in zip(inputs, need)]
        # where, not a product: the upstream gradient of an ignored row may be anything
        coef = torch.where(valid, g_rows.to(cdt), 0.0)
        mine, local = _owned(targets, valid, vs)
        n = hs.shape[0]
        step = chunk_rows(n, ws.shape[0], cdt, hs.device)
        for s in range(0, n, step):
            e = min(s + step, n)
            ys, yt, cap_s, cap_t = _logits(stu, tea, s, e, cfg)
            g_s, g_t = _chunk_grads(ys, yt, stats[:, s:e], coef[s:e], mine[s:e], local[s:e], cfg,
                                    any(need[3:]))
            for off, head, g, cap in ((0, stu, g_s, cap_s), (3, tea, g_t, cap_t)):
                if g is None or not any(need[off:off + 3]):
                    continue
                if cap is not None:
                    g.mul_(cap)
                dh, dw, db = grads[off:off + 3]
                if dh is not None:
                    dh[s:e] = head.grad_hidden(g)
                if dw is not None:
                    head.add_grad_weight(dw, g, s, e)
                if db is not None:
                    db += g.sum(0)
        return (*[None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs)],
                None, None, None, None)


def _pass2(stu, tea, lse, step, cfg, vs):
    """Per-token sums of D's terms over the whole vocabulary: (1, N) D for the KLs, (2, N)
    KL(p||m), KL(q||m) for the JSD."""
    beta, inv_t, n = cfg.beta, 1.0 / cfg.temperature, lse.shape[1]
    part = lse.new_zeros(1 if beta in (0.0, 1.0) else 2, n)
    for s in range(0, n, step):
        e = min(s + step, n)
        ys, yt, _, _ = _logits(stu, tea, s, e, cfg)
        log_q = ys.mul_(inv_t).sub_(lse[0, s:e, None])
        log_p = yt.mul_(inv_t).sub_(lse[1, s:e, None])
        if beta == 0.0:
            part[0, s:e] = (log_p.exp() * (log_p - log_q)).sum(1)
        elif beta == 1.0:
            part[0, s:e] = (log_q.exp() * (log_q - log_p)).sum(1)
        else:
            log_m = _log_m(log_q, log_p, beta)
            part[0, s:e] = (log_p.exp() * (log_p - log_m)).sum(1)
            part[1, s:e] = (log_q.exp() * (log_q - log_m)).sum(1)
    return gather(part, vs.group).sum(dim=0)


def _chunk_grads(ys, yt, stats, coef, mine, local, cfg, want_t):
    """d(sum_i coef_i loss_i) w.r.t. a chunk's student and teacher logits after softcap (the
    teacher's None unless ``want_t``); ys, yt are consumed. ``stats``: the forward's per-token
    global values [lse_a, lse_b][, lse_s][, D or KL(p||m), KL(q||m)] for this chunk."""
    beta, ce_weight, inv_t = cfg.beta, cfg.ce_weight, 1.0 / cfg.temperature
    div = ce_weight < 1.0
    g_s = torch.zeros_like(ys)
    g_t = torch.zeros_like(yt) if want_t else None
    if ce_weight > 0.0:
        k = (ce_weight * coef)[:, None]
        g_s.add_(torch.exp(ys - stats[2 * div, :, None]).mul_(k))
        # the target's -1 only where this rank owns it
        g_s.scatter_add_(1, local, torch.where(mine[:, None], -k, 0.0))
    if not div:
        return g_s, g_t
    tot = stats[-1 if beta in (0.0, 1.0) else -2:]  # D, or (KL(p||m), KL(q||m))
    log_q = ys.mul_(inv_t).sub_(stats[0, :, None])
    log_p = yt.mul_(inv_t).sub_(stats[1, :, None])
    q, p = log_q.exp(), log_p.exp()
    if beta == 0.0:
        da = q - p
        db = p * (log_p - log_q - tot[0, :, None]) if want_t else None
    elif beta == 1.0:
        da = q * (log_q - log_p - tot[0, :, None])
        db = p - q if want_t else None
    else:
        log_m = _log_m(log_q, log_p, beta)
        da = q * (log_q - log_m - tot[1, :, None]) * (1.0 - beta)
        db = p * (log_p - log_m - tot[0, :, None]) * beta if want_t else None
    k = ((1.0 - ce_weight) * inv_t * coef)[:, None]
    g_s.add_(da.mul_(k))
    if want_t:
        g_t.add_(db.mul_(k))
    return g_s, g_t


def vocab_parallel_distill_rows(hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor, wt: Tensor,
                                bt: Tensor | None, targets: Tensor, valid: Tensor, opts: Options,
                                vs: VocabSlice) -> Tensor:
    """Per-token distillation losses (N,) over the whole vocabulary from this rank's slices.

    Args:
        hs (N, Ds), ht (N, Dt): the same on every rank. ws (V_r, Ds), bs (V_r,) or None, wt
            (V_r, Dt), bt: this rank's rows [vs.start, vs.stop) of both heads. targets (N,)
            int64 global class ids (any value where ``valid`` is False); valid (N,) bool.
        opts: the call's Options (its distillation fields, as
            :func:`cutce.backends.pytorch.distill.distill_rows` reads them). vs: the split.

    Returns:
        float32 (float64 for float64 heads), 0 where not valid, equal on every rank to the
        unsplit rows; differentiable from any upstream gradient. hs/ht get the full dE (summed
        over the group; this rank's share if ``vs.reduce_hidden_grad`` is False), the weights
        and biases their slice's gradient.
    """
    if vs.reduce_hidden_grad:
        hs, ht = (SumGradAcrossGroup.apply(h, vs.group) if h.requires_grad else h
                  for h in (hs, ht))
    cfg = _Cfg(*opts.distill_scalars())
    with torch.autocast(hs.device.type, enabled=False):
        return _DistillRows.apply(hs, ws, bs, ht, wt, bt, targets, valid, cfg, vs)
