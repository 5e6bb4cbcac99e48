"""The Triton path as torch.library custom ops (opaque to torch.compile) with fake impls and autograd.

``cutce::lse_parts`` computes the backend contract (see :mod:`cutce.backends.pytorch.ce`) and
``cutce::lse_parts_backward`` its gradients. Both are opaque to torch.compile, so a compiled
function that calls cutce has no graph break and no host sync around them; the exact backward is
sync-free (CUDA-graph safe), the filtered one syncs once to count the classes it keeps.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...engine import planner
from ...engine.loss import live_rows
from ...engine.contract import Parts, StatParts
from ...engine.options import Options
from .. import grads
from ..grads import by_name
from ..resources import out_of_memory, warn_memory_fallback
from . import backward as _bw
from . import forward as _fw
from . import elementwise, fit
from . import fused as _fused
from . import kept as _kept


@torch.library.custom_op("cutce::lse_parts", mutates_args=())
@fit.fits
def lse_parts_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                 class_weight: Optional[Tensor], row_inv_temp: Optional[Tensor],
                 scale: float, softcap: float, inv_temp: float,
                 need_zsum: bool, need_entropy: bool, filter_eps: float,
                 memory_budget: Optional[float], plan: list[int], bound_all_rows: bool,
                 need_stats: bool = False, keep: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of the contract; filter_eps > 0 also returns the per-class bound ub (else empty),
    over every row with ``bound_all_rows`` (a returned lse), else over the rows with a target.
    ``plan`` (:meth:`cutce.engine.planner.Plan.encode`, empty when traced) and memory_budget
    only travel to the backward. Then the statistics' lse2, zmax (float32) and amax (int64),
    (N,) with ``need_stats``, else empty; not differentiable. Last, with ``keep`` (the strategy "keep": eager calls only, see
    linear_lse_parts), the kept logits for the backward (:mod:`.kept`), else empty.
    row_inv_temp: None or (N,) float32, each row's logits times it (after inv_temp)."""
    kept = _kept.buffer(hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device) \
        if keep else hidden.new_empty(0)
    out = _fw.forward(hidden, weight, bias, targets, scale, softcap, inv_temp, need_zsum,
                      need_entropy, bound=filter_eps > 0, class_weight=class_weight,
                      bound_all_rows=bound_all_rows, need_stats=need_stats,
                      keep=kept if keep else None, row_inv_temp=row_inv_temp)
    if need_stats:
        return (*out, kept)
    f = hidden.new_empty(0, dtype=torch.float32)
    return (*out, f, f.clone(), hidden.new_empty(0, dtype=torch.int64), kept)


@lse_parts_op.register_fake
def _(hidden, weight, bias, targets, class_weight, row_inv_temp, scale, softcap, inv_temp,
      need_zsum, need_entropy, filter_eps, memory_budget, plan, bound_all_rows, need_stats=False,
      keep=False):
    bound = filter_eps > 0
    n, v = hidden.shape[0], weight.shape[0]
    f = hidden.new_empty(n, dtype=torch.float32)
    k = n if need_stats else 0
    kept = hidden.new_empty((n, planner.kept_width(v, hidden.dtype))) if keep else hidden.new_empty(0)
    return (f, f.clone(), f.clone(), f.clone(), hidden.new_empty(v if bound else 0, dtype=torch.float32),
            f.new_empty(k), f.new_empty(k), hidden.new_empty(k, dtype=torch.int64), kept)


@torch.library.custom_op("cutce::lse_parts_backward", mutates_args=())
@fit.fits
def lse_parts_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          class_weight: Optional[Tensor], row_inv_temp: Optional[Tensor],
                          lse: Tensor, pz: Tensor, ub: Tensor,
                          g_lse: Tensor, g_zt: Tensor, g_zsum: Tensor, g_pz: Tensor, scale: float,
                          softcap: float, inv_temp: float, need_zsum: bool, need_entropy: bool,
                          filter_eps: float, need_h: bool, need_w: bool, need_b: bool,
                          memory_budget: Optional[float],
                          plan: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The contract's gradients, by the recompute strategy of ``plan`` (the api's; planned here
    from memory_budget when the call was traced)."""
    p = planner.decode(plan) or planner.plan_in_op(
        "triton", hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype, need_h, need_w,
        memory_budget, recompute=True, filtered=filter_eps > 0)
    return _bw.backward(hidden, weight, bias, targets, lse, pz, ub, g_lse, g_zt, g_zsum, g_pz,
                        scale, softcap, inv_temp, need_zsum, need_entropy,
                        filter_eps, need_h, need_w, need_b, p, class_weight=class_weight,
                        row_inv_temp=row_inv_temp)


@lse_parts_backward_op.register_fake
def _(hidden, weight, bias, targets, class_weight, row_inv_temp, lse, pz, ub, g_lse, g_zt, g_zsum,
      g_pz, scale, softcap, inv_temp, need_zsum, need_entropy, filter_eps, need_h, need_w, need_b,
      memory_budget, plan):
    # distinct empties: a custom op's outputs may not alias each other
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else hidden.new_empty(0),
            torch.empty_like(bias) if (need_b and bias is not None) else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, cw, rit, scale, softcap, inv_temp, need_zsum, need_entropy, \
        eps, budget, plan, *_ = inputs
    lse, zt, _, pz, ub, *stats, kept = output
    ctx.save_for_backward(hidden, weight, bias, targets, cw, rit, lse, pz, ub)
    ctx.mark_non_differentiable(*stats, kept)  # the statistics (metrics), the kept logits
    ctx.scalars = (scale, softcap, inv_temp, need_zsum, need_entropy, eps)
    ctx.budget, ctx.plan = budget, plan
    # Held outside save_for_backward: the backward overwrites them, and drops them after use.
    ctx.kept = (kept, zt) if kept.numel() else None


def _backward(ctx, g_lse, g_zt, g_zsum, g_pz, _g_ub, *_g_stats):
    hidden, weight, bias, targets, cw, rit, lse, pz, ub = ctx.saved_tensors
    scale, softcap, inv_temp, need_zsum, need_entropy, eps = ctx.scalars
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    z = torch.zeros_like(lse)
    grads = [z if g is None else g.contiguous() for g in (g_lse, g_zt, g_zsum, g_pz)]
    if ctx.kept is not None:
        # The first backward consumes the kept logits in place; a second one (retain_graph)
        # finds them gone and recomputes them from the saved inputs below.
        (kept, zt), ctx.kept = ctx.kept, None
        dh, dw, db = _kept.backward(
            kept, hidden, weight, bias, targets, zt, lse, pz, *grads, scale, softcap, inv_temp,
            need_zsum, need_entropy and g_pz is not None, need_h, need_w, need_b, cw,
            row_inv_temp=rit)
        del kept
        return by_name(lse_parts_op, hidden=dh, weight=dw, bias=db)
    try:
        dh, dw, db = lse_parts_backward_op(
            hidden, weight, bias, targets, cw, rit, lse, pz, ub, *grads, scale, softcap, inv_temp,
            need_zsum, need_entropy and g_pz is not None, eps, need_h, need_w, need_b, ctx.budget,
            ctx.plan)
    except torch.OutOfMemoryError as err:
        raise out_of_memory(err, hidden, weight, need_h, need_w, ctx.budget, "triton") from None
    return by_name(lse_parts_op, hidden=dh if need_h else None,
                   weight=dw if need_w else None, bias=db if need_b else None)


lse_parts_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("cutce::fused_loss", mutates_args=())
@fit.fits
def fused_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                  coef: Tensor, scale: float, softcap: float, memory_budget: Optional[float],
                  plan: list[int], need_h: bool, need_w: bool, need_b: bool,
                  soft_ids: Optional[Tensor] = None,
                  soft_coef: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A training call's (total, lse, dh, dw, db), gradients formed in the forward, by ``plan``
    (the api's; when the call was traced, planned here at run time, so that torch.compile never
    specializes on the number of tokens): the fused strategy (cutce.backends.triton.fused), or,
    when the budget holds no fused chunk, the recompute kernels right away with the known
    upstream gradients. Soft targets (soft_ids, soft_coef) need the fused plan: the api passes
    them with one only."""
    n, d = hidden.shape
    p = planner.decode(plan) or planner.plan_in_op(
        "triton", n, weight.shape[0], d, hidden.dtype, need_h, need_w, memory_budget, reduced=True)
    if p.fused:
        return _fused.fused_loss(hidden, weight, bias, targets, coef, scale, softcap,
                                 p.chunk_n, p.dc_in_place, need_h, need_w, need_b, soft_ids,
                                 soft_coef)
    assert soft_ids is None, "cutce: soft targets reach the op with a fused plan only"
    lse, zt, _, pz, ub = _fw.forward(hidden, weight, bias, targets, scale, softcap, 1.0, False, False)
    valid = (targets >= 0) & (targets < weight.shape[0])
    k = torch.where(valid, coef, 0.0)
    zeros = torch.zeros_like(lse)
    dh, dw, db = _bw.backward(hidden, weight, bias, targets, lse, pz, ub, k[0] + 2.0 * k[3] * lse,
                              -k[1], zeros, zeros, scale, softcap, 1.0, False, False, 0.0,
                              need_h, need_w, need_b, p)
    total = torch.where(live_rows(k), k[0] * lse - k[1] * zt + k[3] * lse.square(), 0.0).sum()
    return total, lse, dh, dw, db


@fused_loss_op.register_fake
def _(hidden, weight, bias, targets, coef, scale, softcap, memory_budget, plan, need_h, need_w,
      need_b, soft_ids=None, soft_coef=None):
    f = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    return (f.new_empty(()), f, torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else hidden.new_empty(0),
            torch.empty_like(bias) if need_b else hidden.new_empty(0))


def _fused_setup_context(ctx, inputs, output):
    grads.fused_setup_context(ctx, inputs, output)
    ctx.scale_ = elementwise.scale_


fused_loss_op.register_autograd(grads.fused_backward, setup_context=_fused_setup_context)


def fused_loss(hidden, weight, bias, targets, coef, opts: Options, class_weight=None, plan=None,
               soft=None):
    """A training call on the Triton path (same contract as :func:`cutce.backends.pytorch.ce.fused_loss`;
    label smoothing 0, bfloat16 or float32)."""
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    need = [t is not None and t.requires_grad and torch.is_grad_enabled() for t in (hidden, weight, bias)]
    total, lse, *_ = fused_loss_op(hidden, weight, bias, targets.contiguous(),
                                   coef.detach().float().contiguous(), opts.logit_scale,
                                   opts.softcap or 0.0, opts.memory_budget,
                                   [] if plan is None else plan.encode(), *need,
                                   *_soft_args(soft))
    return total, lse


def _soft_args(soft):
    if soft is None:
        return None, None
    ids, a = soft
    return ids.contiguous(), a.detach().float().contiguous()


def linear_lse_parts(hidden, weight, bias, targets, opts: Options, class_weight=None,
                     inv_temp=None, plan=None):
    """The backend contract on the Triton path (same signature and result as
    :func:`cutce.backends.pytorch.ce.linear_lse_parts`; float32 outputs, and with
    ``opts.need_stats`` the three statistics after the four parts). ``plan``: the api's (None
    when traced: the backward op plans at run time); the strategy "keep" stores the logits."""
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    # Filtering skips classes by their bound; label smoothing's gradient touches every class, so
    # with it the backward stays exact (documented on filter_eps).
    filt = opts.filter_eps is not None and wants_grad and not opts.need_zsum
    keep = wants_grad and plan is not None and plan.strategy == "keep" and not filt
    args = (hidden, weight, bias, targets.contiguous(),
            None if class_weight is None else class_weight.float().contiguous(),
            None if inv_temp is None else inv_temp.detach().float().contiguous(),
            opts.logit_scale, opts.softcap or 0.0,
            1.0 / opts.temperature, opts.need_zsum, opts.need_entropy,
            opts.filter_eps if filt else 0.0, opts.memory_budget,
            [] if plan is None else plan.encode(), opts.lse_out, opts.need_stats)
    try:
        out = lse_parts_op(*args, keep)
    except torch.OutOfMemoryError as err:
        if not keep:
            raise
        # The kept logits did not fit beside what the device holds: recompute instead (the
        # minimum's forward keeps O(N)), and say so once, as the fused strategy's fallback does.
        warn_memory_fallback(
            f"cutce: memory_budget={opts.memory_budget!r} planned to keep this call's logits, "
            f"which ran out of device memory ({str(err).splitlines()[0][:120]}); recomputing "
            f"them in the backward instead (the recompute strategy)",
            (opts.memory_budget, "triton", "keep"))
        out = lse_parts_op(*args, False)
    return StatParts(*out[:4], *out[5:8]) if opts.need_stats else Parts(*out[:4])
