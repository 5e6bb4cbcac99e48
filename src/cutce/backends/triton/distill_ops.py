"""The Triton distillation path as torch.library custom ops (opaque to torch.compile).

``cutce::distill_rows_triton`` gives the per-token losses and the O(N) statistics its backward
needs; ``cutce::distill_backward_triton`` recomputes both heads' logit tiles from them (the
recompute strategy). ``cutce::distill_fused_triton`` is the fused strategy
(:mod:`cutce.backends.triton.distill_fused`): a "mean"/"sum" call with a frozen teacher whose student
gradients are formed in the forward, when the planner (:mod:`cutce.engine.planner`) says so.
Same functions as :mod:`cutce.backends.pytorch.distill` (``distill_total``, ``distill_rows``,
``compute_dtype``, ``plan_hints``), so the api dispatches to either.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...engine import planner
from .. import grads
from ..grads import by_name
from . import configs
from . import distill as _k
from . import distill_backward as _kb
from . import distill_fused as _kf
from . import fit
from .elementwise import scale_ as _scale_

def mode_of(beta: float) -> int:
    return _k.FWD_KL if beta == 0.0 else _k.REV_KL if beta == 1.0 else _k.JSD


@torch.library.custom_op("cutce::distill_rows_triton", mutates_args=())
@fit.fits
def _rows_op(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor,
             bt: Optional[Tensor], targets: Tensor, beta: float, temperature: float,
             cap_s: float, cap_t: float, ce_weight: float) -> tuple[Tensor, Tensor]:
    """(rows (N,), stats (5, N)) float32: rows_i = (1 - ce_weight) D_i + ce_weight CE_i."""
    stats, d, zt1 = _k.forward(hs, ws, bs, ht, wt, bt, targets, mode_of(beta), beta,
                               temperature, cap_s, cap_t, ce_weight > 0)
    rows = (1.0 - ce_weight) * d
    if ce_weight > 0:
        rows = rows + ce_weight * (stats[4] - zt1)
    return rows, stats


@_rows_op.register_fake
def _(hs, ws, bs, ht, wt, bt, targets, beta, temperature, cap_s, cap_t, ce_weight):
    n = hs.shape[0]
    return hs.new_empty(n, dtype=torch.float32), hs.new_empty((5, n), dtype=torch.float32)


@torch.library.custom_op("cutce::distill_backward_triton", mutates_args=())
@fit.fits
def _backward_op(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor,
                 bt: Optional[Tensor], targets: Tensor, stats: Tensor, g_rows: Tensor,
                 beta: float, temperature: float, cap_s: float, cap_t: float, ce_weight: float,
                 nhs: bool, nws: bool, nbs: bool, nht: bool, nwt: bool,
                 nbt: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    need = (nhs, nws, nbs, nht, nwt, nbt)
    grads = _kb.backward(hs, ws, bs, ht, wt, bt, targets, stats, g_rows, mode_of(beta), beta,
                        temperature, cap_s, cap_t, ce_weight, need)
    like = (hs, ws, bs, ht, wt, bt)
    return tuple(g.to(t.dtype) if on else g for g, t, on in zip(grads, like, need))


@_backward_op.register_fake
def _(hs, ws, bs, ht, wt, bt, targets, stats, g_rows, beta, temperature, cap_s, cap_t, ce_weight,
      *need):
    return tuple(torch.empty_like(t) if on else hs.new_empty(0)
                 for t, on in zip((hs, ws, bs, ht, wt, bt), need))


def _setup(ctx, inputs, output):
    hs, ws, bs, ht, wt, bt, targets, *scalars = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hs, ws, bs, ht, wt, bt, targets, output[1])
    ctx.scalars = scalars


def _backward(ctx, g_rows, _g_stats):
    hs, ws, bs, ht, wt, bt, targets, stats = ctx.saved_tensors
    need = [bool(n) and t is not None for n, t in zip(ctx.needs_input_grad[:6],
                                                      (hs, ws, bs, ht, wt, bt))]
    if g_rows is None or not any(need):
        return by_name(_rows_op)
    grads = _backward_op(hs, ws, bs, ht, wt, bt, targets, stats, g_rows.float().contiguous(),
                         *ctx.scalars, *need)
    return by_name(_rows_op, **{k: g for k, g, on in zip(("hs", "ws", "bs", "ht", "wt", "bt"),
                                                          grads, need) if on})


_rows_op.register_autograd(_backward, setup_context=_setup)


def compute_dtype(*dtypes) -> torch.dtype:
    return torch.float32


def _rows(hs, ws, bs, ht, wt, bt, targets, beta, temperature, cap_s, cap_t, ce_weight):
    def rows_contig(t):
        return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())

    hs, ws, bs, ht, wt, bt = map(rows_contig, (hs, ws, bs, ht, wt, bt))
    return _rows_op(hs, ws, bs, ht, wt, bt, targets.contiguous(), float(beta), float(temperature),
                    float(cap_s), float(cap_t), float(ce_weight))[0]


def distill_rows(hs, ws, bs, ht, wt, bt, targets, valid, opts) -> Tensor:
    """Per-token losses (N,) float32, 0 where ``valid`` is False (as torch_distill's)."""
    return torch.where(valid, _rows(hs, ws, bs, ht, wt, bt, targets, *opts.distill_scalars()),
                       0.0)


@torch.library.custom_op("cutce::distill_fused_triton", mutates_args=())
@fit.fits
def _fused_op(hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor,
              bt: Optional[Tensor], targets: Tensor, coef: Tensor, beta: float, temperature: float,
              cap_s: float, cap_t: float, ce_weight: float, memory_budget: Optional[float],
              plan: list[int], need_h: bool, need_w: bool,
              need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(total, rows, dhs, dws, dbs): sum_i coef_i loss_i, the per-token losses and total's
    gradients w.r.t. the student's head (formed in the forward; empty where not needed).

    By ``plan`` (the api's; when traced, planned here at run time, so that torch.compile never
    specializes on the number of tokens): the fused strategy when the budget fits a chunk, else
    the recompute kernels run right away with the known per-row upstream gradients (coef)."""
    p = planner.decode(plan) or planner.plan_in_op(
        "triton", hs.shape[0], ws.shape[0], hs.shape[1], hs.dtype, need_h, need_w, memory_budget,
        reduced=True, dt=ht.shape[1], teacher_dtype=ht.dtype, beta=beta,
        **_hints(ce_weight, cap_s, hs.device))
    mode = mode_of(beta)
    if p.fused:
        return _kf.fused_total(hs, ws, bs, ht, wt, bt, targets, coef, mode, beta, temperature,
                               cap_s, cap_t, ce_weight, p.chunk_n, p.dc_in_place, p.student_x,
                               need_h, need_w, need_b)
    stats, d, zt1 = _k.forward(hs, ws, bs, ht, wt, bt, targets, mode, beta, temperature, cap_s,
                               cap_t, ce_weight > 0)
    rows = (1.0 - ce_weight) * d
    if ce_weight > 0:
        rows = rows + ce_weight * (stats[4] - zt1)
    g = torch.where(coef != 0, coef, 0.0).float().contiguous()
    need = (need_h, need_w, need_b and bs is not None, False, False, False)
    grads = _kb.backward(hs, ws, bs, ht, wt, bt, targets, stats, g, mode, beta, temperature,
                        cap_s, cap_t, ce_weight, need)
    total = torch.where(coef != 0, rows * coef, 0.0).sum()
    return (total, rows, *[gr.to(t.dtype) if on else hs.new_empty(0)
                           for gr, t, on in zip(grads[:3], (hs, ws, bs), need[:3])])


@_fused_op.register_fake
def _(hs, ws, bs, ht, wt, bt, targets, coef, beta, temperature, cap_s, cap_t, ce_weight,
      memory_budget, plan, need_h, need_w, need_b):
    f = hs.new_empty(hs.shape[0], dtype=torch.float32)
    return (f.new_empty(()), f, *[torch.empty_like(t) if on else hs.new_empty(0)
                                  for t, on in ((hs, need_h), (ws, need_w), (bs, need_b))])


def _fused_setup(ctx, inputs, output):
    grads.fused_setup_context(ctx, inputs, output)
    ctx.scale_ = _scale_


_fused_op.register_autograd(grads.fused_backward, setup_context=_fused_setup)


def plan_hints(opts, device) -> dict:
    """What this backend adds to the planner's distillation plan: whether a fused call may store
    the student's exponentials, and a chunk forced by a KernelConfig override (experiments)."""
    return _hints(opts.ce_weight, opts.softcap or 0.0, device)


def _hints(ce_weight: float, cap_s: float, device) -> dict:
    return dict(student_x=_kf.stores_student_x(ce_weight, cap_s, device),
                chunk=configs.current(device).distill_chunk)


def distill_total(hs, ws, bs, ht, wt, bt, targets, coef, opts, plan=None) -> Tensor:
    """sum_i coef_i loss_i (0-dim float32), coef 0 for ignored rows: the fused op, by the api's
    ``plan`` (None under torch.compile, where the api knew only that the call may fuse: the op
    plans at run time, and a budget that fits no chunk runs the recompute kernels inside it)."""
    need = [t is not None and t.requires_grad for t in (hs, ws, bs)]
    hs, ws, bs, ht, wt, bt = (None if t is None else t if t.stride(-1) == 1 else t.contiguous()
                              for t in (hs, ws, bs, ht, wt, bt))
    return _fused_op(hs, ws, bs, ht, wt, bt, targets.contiguous(), coef.detach().float(),
                     *opts.distill_scalars(),
                     None if opts.memory_budget is None else float(opts.memory_budget),
                     [] if plan is None else plan.encode(), *need)[0]
