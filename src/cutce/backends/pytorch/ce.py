"""Exact chunked PyTorch implementation: the CPU path and the oracle of the kernels.

Every backend computes the same four per-token quantities (the *backend contract*,
:mod:`cutce.engine.contract`); the api turns them into a loss (or log-probabilities) with ordinary
differentiable O(N) torch code, so that every option's gradient term falls out of autograd and the
backends only see four upstream vectors.

    lse_i  = logsumexp_j z_ij
    zt_i   = z_{i, t_i}            (0 where t_i is not in [0, V), e.g. ignore_index)
    zsum_i = sum_j z_ij            (0 unless opts.need_zsum)
    pz_i   = sum_j p_ij z_ij       (0 unless opts.need_entropy), p = softmax(z)

with z the transformed logits of :class:`cutce.engine.options.Options`. Here they are computed in float32
(float64 for float64 inputs) over chunks of tokens: the forward keeps only these O(N) values, the
backward recomputes each chunk's logits. No tensor of N x V elements exists at any time; the peak
extra memory is a chunk of logits (sized from ``opts.chunk_bytes``) plus, when the weight is not
already in the compute dtype, one float32 copy of it and of its gradient accumulator.

With ``opts.need_stats`` (the per-token metrics of :func:`cutce.linear_log_probs`) the parts are
seven, the three more not differentiable (marked so), computed in the same pass:

    lse2_i = logsumexp_j 2 z_ij    (log sum_j p_ij^2 = lse2_i - 2 lse_i)
    zmax_i = max_j z_ij
    amax_i = argmax_j z_ij         int64, the first index of the max (torch.argmax's rule)

Without it the parts are the four above (every caller that unpacks four is unchanged).

The forward and backward chunk loops are ``torch.library`` custom ops (``cutce::torch_lse_parts``
and its backward) with fake implementations, so ``torch.compile`` sees one opaque node: no graph
break, no unrolled loop, and no specialization on the number of tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...engine import planner
from ...engine.loss import live_rows
from ...engine.contract import Parts, StatParts
from ...engine.options import Options
from .. import grads
from . import common
from .common import compute_dtype, softcap_  # noqa: F401  (compute_dtype: part of the backend's face)

DEFAULT_CHUNK_BYTES = 256 * 2**20
# A chunk holds about this many N x V-sized float temporaries at once (z, p/dz, and one more
# inside logsumexp or the softcap derivative).
_TEMPS_PER_CHUNK = 3


def chunk_rows(n_tokens: int, vocab: int, dtype: torch.dtype, chunk_bytes: int | None) -> int:
    """Tokens per chunk so that a chunk's logit temporaries fit in ``chunk_bytes``."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return common.chunk_rows(n_tokens, vocab, dtype, budget, _TEMPS_PER_CHUNK)


def _logits(h, w, b, opts, inv=None):
    """(z, dcap) for one chunk: z as in Options, times the chunk's per-row inverse temperatures
    ``inv`` (None: none); dcap = the softcap's derivative (None without)."""
    y = h @ w.T
    if b is not None:
        y += b
    return transform_(y, opts, inv)


def transform_(y, opts, inv=None):
    """(z, dcap) from the chunk's products y (bias added; y is overwritten): _logits past its
    matmul, for a caller that multiplies the chunk itself."""
    if opts.logit_scale != 1.0:
        y *= opts.logit_scale
    dcap = softcap_(y, opts.softcap)
    if opts.temperature != 1.0:
        y.div_(opts.temperature)  # in place: one chunk x V temporary less
    if inv is not None:
        y *= inv[:, None]
    return y, dcap


def _valid_targets(t, vocab):
    valid = (t >= 0) & (t < vocab)
    return t.clamp(0, vocab - 1).unsqueeze(1), valid


class _Cfg(NamedTuple):
    """The options the torch path reads, in the order of the custom ops' arguments."""

    logit_scale: float
    softcap: float | None
    temperature: float
    need_zsum: bool
    need_entropy: bool
    chunk_bytes: int | None
    need_stats: bool


_CFG_SCHEMA = ("float logit_scale, float? softcap, float temperature, bool need_zsum, "
               "bool need_entropy, int? chunk_bytes, bool need_stats")


def _zsum(z, cw):
    """sum_j z_ij, or sum_j cw_j z_ij with class weights (class-weighted label smoothing)."""
    return z.sum(dim=1) if cw is None else z @ cw


def _forward(hidden, weight, bias, targets, cw, inv_temp, opts: _Cfg):
    cdt = compute_dtype(hidden.dtype)
    n, vocab = hidden.shape[0], weight.shape[0]
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    lse = hidden.new_empty(n, dtype=cdt)
    zt = torch.zeros_like(lse)
    zsum = torch.zeros_like(lse)
    pz = torch.zeros_like(lse)
    # the statistics' parts: empty (never written) without need_stats
    k = n if opts.need_stats else 0
    lse2, zmax = lse.new_empty(k), lse.new_empty(k)
    amax = hidden.new_empty(k, dtype=torch.int64)
    rows = chunk_rows(n, vocab, cdt, opts.chunk_bytes)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        inv = None if inv_temp is None else inv_temp[s:e]
        z, _ = _logits(hidden[s:e].to(cdt), w, b, opts, inv)
        idx, valid = _valid_targets(targets[s:e], vocab)
        zt[s:e] = torch.where(valid, z.gather(1, idx).squeeze(1), 0.0)
        if opts.need_zsum:
            zsum[s:e] = _zsum(z, cw)
        if opts.need_stats:
            amax[s:e] = z.argmax(dim=1)  # the first index of the max
        # lse = m + log(sum exp(z - m)), not torch.logsumexp: a row with an infinite logit gives
        # NaN (inf - inf), as PyTorch's log_softmax / cross_entropy do, where logsumexp gives
        # inf (and a finite-looking inf loss). In place: z becomes exp(z - m).
        m = z.amax(dim=1, keepdim=True)
        tot = z.sub_(m).exp_().sum(dim=1, keepdim=True)
        lse[s:e] = (m + tot.log()).squeeze(1)
        if opts.need_stats:
            # logsumexp(2 z) = 2 m + log sum (exp(z - m))^2, a row-wise dot: no chunk temporary
            sq = (z.unsqueeze(1) @ z.unsqueeze(2)).view(-1)
            lse2[s:e] = 2.0 * m.squeeze(1) + sq.log()
            zmax[s:e] = m.squeeze(1)
        if opts.need_entropy:
            z.div_(tot)  # z now holds p; (p * z).sum = (p * (log p + lse)).sum
            pz[s:e] = torch.xlogy(z, z).sum(dim=1) + lse[s:e]
    return lse, zt, zsum, pz, lse2, zmax, amax


def _backward(hidden, weight, bias, targets, cw, inv_temp, lse, pz, g_lse, g_zt, g_zsum, g_pz,
              need_h, need_w, need_b, opts: _Cfg):
    cdt = lse.dtype
    n, vocab = hidden.shape[0], weight.shape[0]
    w, b, dh, dw, db, g_lse, g_zt = common.backward_buffers(hidden, weight, bias, lse, g_lse, g_zt,
                                                            need_h, need_w, need_b)
    rows = chunk_rows(n, vocab, cdt, opts.chunk_bytes)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        h = hidden[s:e].to(cdt)
        z, dcap = _logits(h, w, b, opts, None if inv_temp is None else inv_temp[s:e])
        p = torch.exp(z - lse[s:e, None])
        if g_pz is not None and opts.need_entropy:
            # d(sum_j p_j z_j)/dz_k = p_k * (1 + z_k - sum_j p_j z_j)
            z.sub_(pz[s:e, None]).add_(1.0).mul_(g_pz[s:e, None]).add_(g_lse[s:e, None])
            dz = p.mul_(z)
        else:
            dz = p.mul_(g_lse[s:e, None])
        del z
        idx, valid = _valid_targets(targets[s:e], vocab)
        dz.scatter_add_(1, idx, torch.where(valid, g_zt[s:e], 0.0).unsqueeze(1))
        if g_zsum is not None and opts.need_zsum:
            dz += g_zsum[s:e, None] if cw is None else g_zsum[s:e, None] * cw
        scale = opts.logit_scale / opts.temperature
        if dcap is not None:
            dz *= dcap
        if scale != 1.0:
            dz *= scale
        if inv_temp is not None:
            dz *= inv_temp[s:e, None]
        common.add_chunk_grads(dz, h, w, s, e, dh, dw, db)
    return common.op_grads(hidden, weight, bias, dh, dw, db)


# The chunk loops run inside opaque custom ops: torch.compile sees one node with a fake (shape)
# implementation, so it neither unrolls the loop nor specializes on N (dynamic shapes work).
# Autocast is off inside: it would otherwise run the float32 chunk matmuls in its low precision
# dtype (the api already applied autocast's casting to the inputs).
@torch.library.custom_op(
    "cutce::torch_lse_parts", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? cw, "
           f"Tensor? inv_temp, {_CFG_SCHEMA})"
           " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _parts_op(hidden, weight, bias, targets, cw, inv_temp, *cfg):
    with torch.autocast(hidden.device.type, enabled=False):
        return _forward(hidden, weight, bias, targets, cw, inv_temp, _Cfg(*cfg))


@_parts_op.register_fake
def _(hidden, weight, bias, targets, cw, inv_temp, *cfg):
    lse = hidden.new_empty(hidden.shape[0], dtype=compute_dtype(hidden.dtype))
    k = lse.shape[0] if _Cfg(*cfg).need_stats else 0
    return (lse, torch.empty_like(lse), torch.empty_like(lse), torch.empty_like(lse),
            lse.new_empty(k), lse.new_empty(k), hidden.new_empty(k, dtype=torch.int64))


@torch.library.custom_op(
    "cutce::torch_lse_parts_backward", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? cw, "
           "Tensor? inv_temp, Tensor lse, Tensor pz, "
           "Tensor? g_lse, Tensor? g_zt, Tensor? g_zsum, Tensor? g_pz, bool need_h, bool need_w, "
           f"bool need_b, {_CFG_SCHEMA}) -> (Tensor, Tensor, Tensor)")
def _parts_backward_op(hidden, weight, bias, targets, cw, inv_temp, lse, pz, g_lse, g_zt, g_zsum,
                       g_pz, need_h, need_w, need_b, *cfg):
    with torch.autocast(hidden.device.type, enabled=False):
        return _backward(hidden, weight, bias, targets, cw, inv_temp, lse, pz, g_lse, g_zt,
                         g_zsum, g_pz, need_h, need_w, need_b, _Cfg(*cfg))


@_parts_backward_op.register_fake
def _(hidden, weight, bias, targets, cw, inv_temp, lse, pz, g_lse, g_zt, g_zsum, g_pz, need_h,
      need_w, need_b, *cfg):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else hidden.new_empty(0),
            torch.empty_like(bias) if need_b else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, cw, inv_temp, *cfg = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, cw, inv_temp, output[0], output[3])
    ctx.mark_non_differentiable(*output[4:])  # the statistics (metrics)
    ctx.cfg = cfg


def _parts_op_backward(ctx, g_lse, g_zt, g_zsum, g_pz, *_g_stats):
    hidden, weight, bias, targets, cw, inv_temp, lse, pz = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    dh, dw, db = _parts_backward_op(hidden, weight, bias, targets, cw, inv_temp, lse, pz, g_lse,
                                    g_zt, g_zsum, g_pz, need_h, need_w,
                                    need_b and bias is not None, *ctx.cfg)
    return grads.by_name(_parts_op, hidden=dh if need_h else None, weight=dw if need_w else None,
                         bias=db if need_b and bias is not None else None)


_parts_op.register_autograd(_parts_op_backward, setup_context=_setup_context)


# ---- fused strategy (see cutce.engine.planner): gradients formed in the forward, scaled in the backward --

class _FusedCfg(NamedTuple):
    logit_scale: float
    softcap: float | None
    need_zsum: bool
    memory_budget: float | None
    chunk_bytes: int | None
    plan: list
    need_h: bool
    need_w: bool
    need_b: bool


_FUSED_SCHEMA = ("float logit_scale, float? softcap, bool need_zsum, float? memory_budget, "
                 " int? chunk_bytes, int[] plan, bool need_h, bool need_w, bool need_b")


def _fused(hidden, weight, bias, targets, coef, cw, soft_ids, soft_coef, cfg: _FusedCfg):
    cdt = compute_dtype(hidden.dtype)
    n, vocab = hidden.shape[0], weight.shape[0]
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    opts = _Cfg(cfg.logit_scale, cfg.softcap, 1.0, False, False, None, False)
    total = hidden.new_zeros((), dtype=cdt)
    lse = hidden.new_empty(n, dtype=cdt)
    dh = torch.empty_like(hidden) if cfg.need_h else hidden.new_empty(0)
    dw = torch.zeros_like(w) if cfg.need_w else hidden.new_empty(0)
    db = lse.new_zeros(vocab) if cfg.need_b else hidden.new_empty(0)
    # The api's plan; traced calls plan here, at run time (compile never specializes on n).
    # Below the fused plan's smallest chunk, the recompute strategy's chunk (same temporaries).
    p = planner.decode(cfg.plan) or planner.plan_in_op(
        "torch", n, vocab, hidden.shape[1], hidden.dtype, cfg.need_h, cfg.need_w,
        cfg.memory_budget, reduced=True, chunk_bytes=cfg.chunk_bytes)
    rows = p.chunk_n if p.fused else chunk_rows(n, vocab, cdt, cfg.chunk_bytes)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        h = hidden[s:e].to(cdt)
        k = coef[:, s:e].to(cdt)  # per-row coefficients of lse, -zt, -mean_j z, lse^2
        z, dcap = _logits(h, w, b, opts)
        idx, valid = _valid_targets(targets[s:e], vocab)
        zt = torch.where(valid, z.gather(1, idx).squeeze(1), 0.0)
        zmean = _zsum(z, cw) / vocab if cfg.need_zsum else None
        if soft_ids is not None:  # - sum_j a_ij z_ij, and -a_ij in dz below
            si = soft_ids[s:e]
            sidx, sok = si.clamp(0, vocab - 1), (si >= 0) & (si < vocab)
            sa = torch.where(sok, soft_coef[s:e].to(cdt), 0.0)
            total -= (sa * z.gather(1, sidx)).sum()
        # z becomes p in place: one chunk x V temporary (two with softcap)
        m = z.amax(dim=1, keepdim=True)
        p = z.sub_(m).exp_()
        tot = p.sum(dim=1, keepdim=True)
        p.div_(tot)
        l_rows = (m + tot.log()).squeeze(1)
        lse[s:e] = l_rows
        loss = k[0] * l_rows - k[1] * zt + k[3] * l_rows.square()
        if zmean is not None:
            loss = loss - k[2] * zmean
        total += torch.where(valid & live_rows(k), loss, 0.0).sum()
        # d loss_i / d z_ij = (k0 + 2 k3 lse_i) p_ij - k1 [j = t_i] - k2 / V
        dz = p.mul_((k[0] + 2.0 * k[3] * l_rows)[:, None])
        dz.scatter_add_(1, idx, torch.where(valid, -k[1], 0.0).unsqueeze(1))
        if soft_ids is not None:
            dz.scatter_add_(1, sidx, -sa)
        if zmean is not None:
            dz -= k[2, :, None] / vocab if cw is None else k[2, :, None] * (cw / vocab)
        if dcap is not None:
            dz *= dcap
        if cfg.logit_scale != 1.0:
            dz *= cfg.logit_scale
        if cfg.need_h:
            dh[s:e] = (dz @ w).to(hidden.dtype)
        if cfg.need_w:
            dw.addmm_(dz.T, h)
        if cfg.need_b:
            db += dz.sum(dim=0)
    dw = dw.to(weight.dtype) if cfg.need_w else dw
    db = db.to(bias.dtype) if cfg.need_b else db
    return total, lse, dh, dw, db


@torch.library.custom_op(
    "cutce::torch_fused_loss", mutates_args=(),
    schema=f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor coef, Tensor? cw, "
           f"Tensor? soft_ids, Tensor? soft_coef, {_FUSED_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor, "
           "Tensor)")
def _fused_op(hidden, weight, bias, targets, coef, cw, soft_ids, soft_coef, *cfg):
    with torch.autocast(hidden.device.type, enabled=False):
        return _fused(hidden, weight, bias, targets, coef, cw, soft_ids, soft_coef,
                      _FusedCfg(*cfg))


@_fused_op.register_fake
def _(hidden, weight, bias, targets, coef, cw, soft_ids, soft_coef, *cfg):
    c = _FusedCfg(*cfg)
    cdt = compute_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=cdt), hidden.new_empty(hidden.shape[0], dtype=cdt),
            torch.empty_like(hidden) if c.need_h else hidden.new_empty(0),
            torch.empty_like(weight) if c.need_w else hidden.new_empty(0),
            torch.empty_like(bias) if c.need_b else hidden.new_empty(0))


_fused_op.register_autograd(grads.fused_backward, setup_context=grads.fused_setup_context)


def fused_loss(hidden, weight, bias, targets, coef, opts: Options, class_weight=None, plan=None,
               soft=None):
    """A training call on the torch path: the loss's total and its gradients in one pass.

    Args:
        hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) int64 as in
        :func:`linear_lse_parts`; coef (4, N) float: each row's coefficients (k0, k1, k2, k3) of
        lse, -zt, -mean_j z (-(z @ class_weight) / V with class weights) and lse^2 in the total
        (0 for ignored rows; token weights, class weights, label
        smoothing, z-loss and "mean"'s 1/denominator folded in by the api). The chunk of tokens
        comes from ``plan`` (the api's :class:`~cutce.engine.planner.Plan`; None when traced).
        soft: None or (ids, a), (N, K) int64 class ids (distinct per row; outside [0, V): none)
        and float coefficients, not differentiated: soft targets.

    Returns:
        (total, lse): total = sum_i k0 lse_i - k1 zt_i - k2 mean_j z_ij + k3 lse_i^2
        - sum_ij a_ij z_{i, ids_ij} (0-dim, float32/float64), differentiable w.r.t. hidden,
        weight and bias (its backward scales the gradients formed here); lse (N,) not
        differentiable.
    """
    need = [t is not None and t.requires_grad and torch.is_grad_enabled() for t in (hidden, weight, bias)]
    cfg = _FusedCfg(float(opts.logit_scale), opts.softcap, opts.need_zsum,
                    opts.memory_budget, opts.chunk_bytes, [] if plan is None else plan.encode(),
                    *need)
    cw = None if class_weight is None else class_weight.to(compute_dtype(hidden.dtype))
    ids, a = (None, None) if soft is None else (soft[0], soft[1].detach())
    total, lse, *_ = _fused_op(hidden, weight, bias, targets, coef.detach(), cw, ids, a, *cfg)
    return total, lse


def linear_lse_parts(hidden, weight, bias, targets, opts: Options, class_weight=None,
                     inv_temp=None, plan=None):
    """The backend contract on the torch path.

    Args:
        hidden: (N, D) float tensor.
        weight: (V, D), same dtype and device as hidden.
        bias: (V,) or None.
        targets: (N,) int64; entries outside [0, V) give zt = 0.
        opts: validated :class:`Options`.
        inv_temp: None, or (N,) float per-token inverse temperatures (not differentiated): row
            i's logits z_i are multiplied by inv_temp[i] (after opts.temperature).

    Returns:
        (lse, zt, zsum, pz), each (N,) float32 (float64 for float64 inputs), differentiable with
        respect to hidden, weight and bias. Equal to, with z the transformed logits in float32::

            lse = torch.logsumexp(z, -1); zt = z.gather(1, targets[:, None])[:, 0]
            zsum = z.sum(-1); pz = (z.softmax(-1) * z).sum(-1)

        With ``class_weight`` (V,), zsum = z @ class_weight (class-weighted label smoothing).
        With ``opts.need_stats``, (lse, zt, zsum, pz, lse2, zmax, amax): three more (N,), not
        differentiable::

            lse2 = torch.logsumexp(2 * z, -1); zmax = z.amax(-1); amax = z.argmax(-1)  # int64
    """
    cfg = _Cfg(float(opts.logit_scale), opts.softcap, float(opts.temperature), opts.need_zsum,
               opts.need_entropy, opts.chunk_bytes, opts.need_stats)
    cw = None if class_weight is None else class_weight.to(compute_dtype(hidden.dtype))
    if inv_temp is not None:
        inv_temp = inv_temp.detach().to(compute_dtype(hidden.dtype))
    parts = _parts_op(hidden, weight, bias, targets, cw, inv_temp, *cfg)
    return StatParts(*parts) if opts.need_stats else Parts(*parts[:4])
