"""Exact chunked PyTorch implementation of the distillation loss: the CPU path and the oracle.

Per token i, with the two heads' transformed logits (softcap, then / temperature T)::

    a_i = student logits / T,  q_i = softmax(a_i);   b_i = teacher logits / T,  p_i = softmax(b_i)
    D_i = sum_j p (log p - log q)                       beta = 0  (forward KL)
        = sum_j q (log q - log p)                       beta = 1  (reverse KL)
        = beta KL(p || m) + (1 - beta) KL(q || m)       else, m = beta p + (1 - beta) q
    CE_i = logsumexp(s_i) - s_i[target_i]               s_i = student logits (softcap, T = 1)
    loss_i = (1 - ce_weight) D_i + ce_weight CE_i

and the derivatives the chunks form (u_j = log q_j - log m_j, v_j = log p_j - log m_j)::

    beta = 0:  dD/da = q - p                  dD/db = p (log p - log q - D)
    beta = 1:  dD/da = q (log q - log p - D)  dD/db = p - q
    JSD:       dD/da = (1-beta) q (u - KL(q||m))   dD/db = beta p (v - KL(p||m))

(the JSD's equal beta sum p log p + (1-beta) sum q log q - sum m log m, whose derivative in q is
(1-beta)(log q - log m)). The logits of a chunk of tokens exist as float32 (float64 for float64
inputs) chunk x V tiles; no N x V tensor is created. On CUDA, 16-bit inputs are multiplied in
their own dtype with float32 results (no float32 copy of a 150k x 3584 teacher head).

Two custom ops (opaque to torch.compile, with fake implementations):

* ``cutce::torch_distill`` -- a call whose upstream gradient is one scalar (reduction "mean" or
  "sum"): every row's coefficient c_i is known in the forward, so each chunk's logits are computed
  once and the gradients of total = sum_i c_i loss_i formed right away (the teacher's only when
  its tensors require grad). Nothing of the teacher is saved for the backward, which only scales
  the gradients by the upstream scalar.
* ``cutce::torch_distill_rows`` -- per-token losses (reduction "none"): the backward gets any
  upstream vector and recomputes both heads' chunks (the teacher's tensors are saved for it).
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

from ...engine import planner
from ..grads import by_name
from . import common
from .common import Head, compute_dtype, softcap_  # noqa: F401  (compute_dtype: part of the backend's face)

# Bytes of one chunk's float temporaries (about _TEMPS chunk x V tensors live at once). On the
# GPU larger chunks keep the GEMMs efficient; on the CPU they gain nothing.
CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 2 * 2**30}
_TEMPS = 10


def chunk_rows(n: int, vocab: int, cdt: torch.dtype, device: torch.device) -> int:
    return common.chunk_rows(n, vocab, cdt, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"]), _TEMPS)


def _chunk(ys, yt, tgt, coef, cfg, want_grad, want_t):
    """Per-row losses of a chunk and (when want_grad) the gradients of sum_i coef_i loss_i with
    respect to the student's logits after softcap (before / T), and the teacher's if want_t
    (else None); ys, yt are consumed."""
    beta, temperature, ce_weight = cfg["beta"], cfg["temperature"], cfg["ce_weight"]
    inv_t = 1.0 / temperature
    ds_cap = softcap_(ys, cfg["softcap_s"])
    dt_cap = softcap_(yt, cfg["softcap_t"])
    loss = torch.zeros(ys.shape[0], dtype=ys.dtype, device=ys.device)
    g_s = torch.zeros_like(ys) if want_grad else None
    g_t = None
    if ce_weight > 0.0:
        lse1 = torch.logsumexp(ys, dim=1)
        idx = tgt.clamp(0, ys.shape[1] - 1)[:, None]
        loss += ce_weight * (lse1 - ys.gather(1, idx)[:, 0])
        if want_grad:
            k = (ce_weight * coef)[:, None]
            g_s.add_(torch.exp(ys - lse1[:, None]).mul_(k)).scatter_add_(1, idx, -k)
    if ce_weight < 1.0:
        w = 1.0 - ce_weight
        log_q = torch.log_softmax(ys.mul_(inv_t), dim=1)
        log_p = torch.log_softmax(yt.mul_(inv_t), dim=1)
        del ys, yt
        q, p = log_q.exp(), log_p.exp()
        if beta == 0.0:
            diff = log_p.sub_(log_q)  # log p - log q
            d = (p * diff).sum(1)
            if want_grad:
                da = q - p
                db = p.mul_(diff.sub_(d[:, None])) if want_t else None
        elif beta == 1.0:
            diff = log_q.sub_(log_p)
            d = (q * diff).sum(1)
            if want_grad:
                db = p - q if want_t else None
                da = q.mul_(diff.sub_(d[:, None]))
        else:
            # log m = logaddexp(log p + log beta, log q + log(1 - beta)): finite wherever p or
            # q underflows, unlike log(beta p + (1 - beta) q).
            log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
            v, u = log_p.sub_(log_m), log_q.sub_(log_m)
            del log_m
            kl_p, kl_q = (p * v).sum(1), (q * u).sum(1)
            d = beta * kl_p + (1.0 - beta) * kl_q
            if want_grad:
                da = q.mul_(u.sub_(kl_q[:, None])).mul_(1.0 - beta)
                db = p.mul_(v.sub_(kl_p[:, None])).mul_(beta) if want_t else None
        loss += w * d
        if want_grad:
            k = (w * inv_t * coef)[:, None]
            g_s.add_(da.mul_(k))
            g_t = None if db is None else db.mul_(k)
    if want_grad:
        if ds_cap is not None:
            g_s.mul_(ds_cap)
        if g_t is not None and dt_cap is not None:
            g_t.mul_(dt_cap)
    return loss, g_s, g_t


def _run(hs, ws, bs, ht, wt, bt, targets, coef, cfg, need, chunk=0):
    """(total, rows, dhs, dws, dbs, dht, dwt, dbt): total = sum_i coef_i rows_i and its
    gradients w.r.t. the tensors flagged in ``need`` (empty tensors for the others); ``chunk``:
    the plan's tokens per chunk (0: the device's default chunk bytes decide; never more)."""
    cdt = compute_dtype(hs.dtype, ht.dtype)
    n, vocab = hs.shape[0], ws.shape[0]
    stu, tea = Head(hs, ws, bs, cdt), Head(ht, wt, bt, cdt)
    n_s, n_t = need[:3], need[3:]
    want = any(need)
    rows = hs.new_zeros(n, dtype=cdt)

    def buf(t, on, zeros):
        if not on:
            return t.new_empty(0)
        return t.new_zeros(t.shape, dtype=cdt) if zeros else t.new_empty(t.shape)

    dhs, dws, dbs = buf(hs, n_s[0], False), buf(ws, n_s[1], True), buf(ws[:, 0], n_s[2], True)
    dht, dwt, dbt = buf(ht, n_t[0], False), buf(wt, n_t[1], True), buf(wt[:, 0], n_t[2], True)
    step = chunk_rows(n, vocab, cdt, hs.device)
    step = min(step, chunk) if chunk > 0 else step
    for s in range(0, n, step):
        e = min(s + step, n)
        c = coef[s:e].to(cdt)
        loss, g_s, g_t = _chunk(stu.logits(s, e), tea.logits(s, e), targets[s:e], c, cfg, want,
                                any(n_t))
        rows[s:e] = loss
        if not want:
            continue
        for (dh, dw, db), head, g, on in (((dhs, dws, dbs), stu, g_s, n_s),
                                          ((dht, dwt, dbt), tea, g_t, n_t)):
            if g is None or not any(on):
                if any(on) and on[0]:  # ce_weight = 1: the teacher's gradient is zero
                    dh[s:e] = 0.0
                continue
            if on[0]:
                dh[s:e] = head.grad_hidden(g).to(dh.dtype)
            if on[1]:
                head.add_grad_weight(dw, g, s, e)
            if on[2]:
                db += g.sum(0)
        del g_s, g_t
    # where, not a product: an ignored row's loss may be NaN (e.g. a NaN hidden state there)
    total = torch.where(coef != 0, rows * coef.to(cdt), 0.0).sum()
    grads = [g if g.numel() == 0 or g.dtype == t.dtype else g.to(t.dtype)
             for g, t in zip((dhs, dws, dbs, dht, dwt, dbt), (hs, ws, ws, ht, wt, wt))]
    if bs is not None and n_s[2]:
        grads[2] = grads[2].to(bs.dtype)
    if bt is not None and n_t[2]:
        grads[5] = grads[5].to(bt.dtype)
    return (total, rows, *grads)


_OUT = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
_HEADS = ("hs", "ws", "bs", "ht", "wt", "bt")  # the ops' differentiable arguments, in order
_ARGS = ("Tensor hs, Tensor ws, Tensor? bs, Tensor ht, Tensor wt, Tensor? bt, Tensor targets, "
         "Tensor coef, float beta, float temperature, float softcap_s, float softcap_t, "
         "float ce_weight")
_NEED = "bool nhs, bool nws, bool nbs, bool nht, bool nwt, bool nbt"


def _cfg(beta, temperature, softcap_s, softcap_t, ce_weight):
    return dict(beta=beta, temperature=temperature, softcap_s=softcap_s, softcap_t=softcap_t,
                ce_weight=ce_weight)


@torch.library.custom_op("cutce::torch_distill", mutates_args=(),
                         schema=f"({_ARGS}, int chunk, {_NEED}) -> {_OUT}")
def _distill_op(hs, ws, bs, ht, wt, bt, targets, coef, beta, temperature, softcap_s, softcap_t,
                ce_weight, chunk, *need):
    with torch.autocast(hs.device.type, enabled=False):
        return _run(hs, ws, bs, ht, wt, bt, targets, coef,
                    _cfg(beta, temperature, softcap_s, softcap_t, ce_weight), need, chunk)


@_distill_op.register_fake
def _(hs, ws, bs, ht, wt, bt, targets, coef, beta, temperature, softcap_s, softcap_t, ce_weight,
      chunk, *need):
    cdt = compute_dtype(hs.dtype, ht.dtype)
    rows = hs.new_empty(hs.shape[0], dtype=cdt)
    outs = [torch.empty_like(t) if on and t is not None else hs.new_empty(0)
            for t, on in zip((hs, ws, bs, ht, wt, bt), need)]
    return (rows.new_empty(()), rows, *outs)


def _fused_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    # No zero-filled upstream grads for the non-differentiable outputs (one is weight-sized).
    ctx.set_materialize_grads(False)
    ctx.grads = list(output[2:])
    ctx.n_inputs = len(inputs)


def _fused_backward(ctx, g_total, *_):
    """The forward's gradients times the upstream scalar, scaled in place and handed out once."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError("cutce: this distillation loss was already backpropagated (its "
                           "gradients are formed in the forward and handed out once); use "
                           "reduction='none' and sum it to backpropagate twice")
    if g_total is None:
        return (None,) * ctx.n_inputs
    out = [g.mul_(g_total) if on else None for g, on in zip(grads, ctx.needs_input_grad)]
    return by_name(_distill_op, **dict(zip(_HEADS, out)))


_distill_op.register_autograd(_fused_backward, setup_context=_fused_setup)


@torch.library.custom_op("cutce::torch_distill_rows", mutates_args=(),
                         schema=f"({_ARGS}) -> Tensor")
def _rows_op(hs, ws, bs, ht, wt, bt, targets, coef, beta, temperature, softcap_s, softcap_t,
             ce_weight):
    with torch.autocast(hs.device.type, enabled=False):
        return _run(hs, ws, bs, ht, wt, bt, targets, coef,
                    _cfg(beta, temperature, softcap_s, softcap_t, ce_weight), (False,) * 6)[1]


@_rows_op.register_fake
def _(hs, ws, bs, ht, wt, bt, targets, coef, *cfg):
    return hs.new_empty(hs.shape[0], dtype=compute_dtype(hs.dtype, ht.dtype))


def _rows_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.cfg = inputs[8:]


def _rows_backward(ctx, g_rows):
    hs, ws, bs, ht, wt, bt, targets, coef = ctx.saved_tensors
    need = [bool(n) and t is not None for n, t in zip(ctx.needs_input_grad[:6],
                                                      (hs, ws, bs, ht, wt, bt))]
    # coef marks the valid rows (1) and the ignored ones (0); the upstream gradient weights them.
    grads = _distill_op(hs, ws, bs, ht, wt, bt, targets, coef * g_rows, *ctx.cfg, 0, *need)[2:]
    return by_name(_rows_op, **{k: g for k, g, on in zip(_HEADS, grads, need) if on})


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)


def plan_hints(opts, device) -> dict:
    """Nothing: the torch path's fused chunk follows its temporaries' size."""
    return {}


def distill_total(hs, ws, bs, ht, wt, bt, targets, coef, opts, plan=None) -> Tensor:
    """sum_i coef_i loss_i (0-dim, float32; float64 when both heads are float64), the fused
    strategy: gradients formed in the forward for the tensors that require grad, the backward
    may run once (the planner takes :func:`distill_rows` otherwise). ``opts``: the call's
    :class:`~cutce.engine.options.Options` (its distillation fields and memory_budget);
    ``plan``: the api's, whose chunk keeps the temporaries within the budget (None when traced:
    planned here).

    Args:
        hs (N, Ds), ws (V, Ds), bs (V,) or None: the student head; ht (N, Dt), wt (V, Dt), bt:
        the teacher's (each head in one float dtype). targets (N,) int64 in [0, V) (any value
        where ce_weight is 0), coef (N,) float (0 for ignored rows). softcaps: 0 = none.
    """
    need = [t is not None and t.requires_grad and torch.is_grad_enabled()
            for t in (hs, ws, bs, ht, wt, bt)]
    beta, temperature, softcap_s, softcap_t, ce_weight = opts.distill_scalars()
    if plan is None:
        plan = planner.plan_in_op("torch", hs.shape[0], ws.shape[0], hs.shape[1], hs.dtype,
                                  need[0], need[1], opts.memory_budget, reduced=True,
                                  dt=ht.shape[1], teacher_dtype=ht.dtype, beta=beta)
    # traced with a budget that holds no chunk's temporaries (eager calls take distill_rows
    # then): the default chunk, not one op per token
    chunk = plan.chunk_n if plan.fused else 0
    return _distill_op(hs, ws, bs, ht, wt, bt, targets, coef.detach(), beta, temperature,
                       softcap_s, softcap_t, ce_weight, chunk, *need)[0]


def distill_rows(hs, ws, bs, ht, wt, bt, targets, valid, opts) -> Tensor:
    """Per-token losses (N,) (0 where ``valid`` is False), differentiable from any upstream
    gradient; arguments as :func:`distill_total` with ``valid`` (N,) bool."""
    coef = valid.to(compute_dtype(hs.dtype, ht.dtype))
    rows = _rows_op(hs, ws, bs, ht, wt, bt, targets, coef, *opts.distill_scalars())
    return torch.where(valid, rows, 0.0)
