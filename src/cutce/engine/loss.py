"""The reduced loss from the backend contract's parts (see :mod:`cutce.backends.pytorch.ce`): token and
class weights, label smoothing, z-loss, the valid tokens and the reduction, as ordinary
differentiable O(N) torch code; and the same loss as per-row coefficients for the fused strategy
(see :mod:`cutce.engine.planner`). Inputs are validated by :mod:`cutce.api` before they get here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .options import Options


class ClassWeights(NamedTuple):
    """A call's class weights: this rank's slice (the whole vector unless vocabulary-parallel),
    each token's target weight (0 where ignored) and their sum over the whole vocabulary."""

    local: torch.Tensor
    of_target: torch.Tensor
    total: torch.Tensor


def class_weight_terms(local, t1, valid, start=0, group_sum=None) -> ClassWeights:
    """The class weights' terms for targets ``t1`` where ``valid``: ``local`` holds classes
    [start, start + len) (the whole vector without a vocabulary split); under a split,
    ``group_sum`` sums the per-token and total shares over the group (one all-reduce of N + 1
    values)."""
    local_v = local.numel()
    idx = t1 - start
    mine = (idx >= 0) & (idx < local_v) & valid
    of_target = torch.where(mine, local[idx.clamp(0, max(local_v - 1, 0))], 0.0)
    total = local.sum()
    if group_sum is not None:  # each rank holds its slice: sum the shares
        both = group_sum(torch.cat([of_target, total[None]]))
        of_target, total = both[:-1], both[-1]
    return ClassWeights(local, of_target, total)


def valid_weights(valid, token_weights, dtype):
    """Each token's weight: its token weight (1 without), 0 where not ``valid``."""
    return valid.to(dtype) if token_weights is None else torch.where(valid, token_weights.to(dtype), 0.0)


def token_coefs(valid, token_weights, reduction, dtype, of_target=None):
    """Each row's weight in a reduced total, the one rule of every function: w_i (1 without
    token weights) where ``valid``, 0 elsewhere; "mean" divides by sum_valid w_i a_i (a: each
    target's class weight, ``of_target``; 1 without), see :func:`mean_denominator`.
    Differentiable in the token weights."""
    w = valid_weights(valid, token_weights, dtype)
    if reduction != "mean":
        return w
    denom = w.sum() if of_target is None else (w * of_target).sum()
    # NaN on valid rows when their weights sum to 0; ignored rows stay 0 whatever the divisor
    return torch.where(valid, w / mean_denominator(denom, valid), 0.0)


def row_coefs(valid, token_weights, opts: Options, dtype, cw, vocab):
    """(4, N) coefficients of each row's lse, -zt, -zsum/V (zsum class-weighted with class
    weights) and lse^2 in the reduced loss (see _loss_from_parts): token and class weights,
    label smoothing, z-loss and "mean"'s 1/sum folded in. Tensors, not float arguments of the
    op, so that compile does not specialize on the option values."""
    a = 1.0 if cw is None else cw.of_target
    w = token_coefs(valid, token_weights, opts.reduction, dtype, None if cw is None else a)
    ls = opts.label_smoothing
    s = 1.0 if cw is None else cw.total / vocab
    if cw is None and ls == 0:
        # The common case in as few ops as possible: their host time comes before the kernels.
        zero = torch.zeros_like(w)
        return torch.stack([w, w, zero, zero if opts.z_loss == 0 else opts.z_loss * w])
    return torch.stack([w * ((1.0 - ls) * a + ls * s), (1.0 - ls) * a * w, ls * w, opts.z_loss * w])


def live_rows(coef):
    """The rows that enter a reduced total: those with any nonzero coefficient in ``coef``
    (4, N) from :func:`row_coefs` (a target of class weight 0 keeps its z-loss and smoothing
    terms; an ignored row has all four 0). Masking the others keeps a NaN/inf in an ignored
    row's lse out of the total. The one rule of every backend; the Triton fused kernel's
    in-kernel ``k0 != 0 or k3 != 0`` is the same set for its coefficients (k2 = 0 without label
    smoothing, and k1 != 0 only where k0 != 0)."""
    return (coef != 0).any(dim=0)


def mean_denominator(denom, valid):
    """"mean"'s divisor: ``denom`` (the valid tokens' summed token x class weights), except
    where it is 0: 1 when no token is valid (the documented 0.0 loss with zero gradients), NaN
    when valid tokens exist but all their weights are 0 (0/0, as F.cross_entropy gives)."""
    return torch.where(denom == 0, torch.where(valid.any(), torch.nan, 1.0), denom)


def loss_from_parts(parts, valid, token_weights, opts: Options, vocab, cw=None):
    """Per token, with a = class_weight[target] and S = sum(class_weight) (a = 1, S = V without):
    (1 - ls) a (lse - zt) + ls (S lse - zsum) / V + z_loss lse^2, times the token weight w;
    "mean" divides by sum(w a) over valid tokens (F.cross_entropy's weight= semantics)."""
    lse, zt, zsum = parts.lse, parts.zt, parts.zsum
    ls = opts.label_smoothing
    if cw is None:
        loss = lse - zt if ls == 0.0 else (1.0 - ls) * (lse - zt) + ls * (lse - zsum / vocab)
    else:
        loss = (1.0 - ls) * cw.of_target * (lse - zt)
        if ls:
            loss = loss + ls * (cw.total * lse - zsum) / vocab
    if opts.z_loss:
        loss = loss + opts.z_loss * lse.square()
    w = valid_weights(valid, token_weights, loss.dtype)
    # where, not a product: an ignored row whose hidden state is NaN/inf must still give 0.
    loss = torch.where(valid, loss * w, 0.0)
    if opts.reduction == "none":
        return loss
    total = loss.sum()
    if opts.reduction == "sum":
        return total
    denom = w.sum() if cw is None else (w * cw.of_target).sum()
    return total / mean_denominator(denom, valid)
