"""A few logits per token: ``y_ij = scale * (hidden_i . weight[idx_ij] + bias[idx_ij])``.

The stored-teacher distillation (:mod:`cutce.sparse_distill`) needs each token's logits at its K
candidate ids only. Gathering ``weight[idx]`` for all tokens at once would be an (N, K, D)
tensor, K times the hidden states; the forward holds it for a chunk of tokens at a time. The
backward holds nothing of the sort: with g the logits' gradient, dE_i = sum_j g_ij W[idx_ij] is
an ``embedding_bag`` (a weighted sum of weight rows per token) and dC is that op's own backward
with dE's upstream set to the hidden states (ids sorted, each id's rows summed: no atomics and
no (N, K, D) product). Cost: O(N K D) reads and multiply-adds each way, on any device, no N x V
tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import compute_dtype

# Bytes of one chunk's gathered rows in the compute dtype (a chunk x K x D tensor; only the
# forward gathers, the backward is gathered_grads). Larger chunks only save Python overhead.
GATHER_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}


def _step(n: int, k: int, d: int, cdt: torch.dtype, device: torch.device) -> int:
    per_row = max(k * d, 1) * torch.finfo(cdt).bits // 8
    return max(1, min(max(n, 1), GATHER_BYTES.get(device.type, GATHER_BYTES["cpu"]) // per_row))


def _rows(weight: Tensor, idx: Tensor, cdt: torch.dtype) -> Tensor:
    """weight[idx] for an (c, K) chunk of indices, as (c, K, D): in the weight's own dtype where
    CUDA multiplies it into float32 results (16-bit; no float32 copy), else in ``cdt``."""
    c, k = idx.shape
    rows = weight.index_select(0, idx.reshape(-1)).view(c, k, weight.shape[1])
    return rows if _mixed(weight) else rows.to(cdt)


def _mixed(t: Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def _bmm(a: Tensor, b: Tensor, cdt: torch.dtype) -> Tensor:
    """a @ b in ``cdt``; 16-bit CUDA operands go in as they are, with float32 results."""
    if _mixed(b):
        return torch.bmm(a.to(b.dtype), b, out_dtype=torch.float32)
    return torch.bmm(a.to(cdt), b.to(cdt))


@torch.library.custom_op("cutce::gathered_grads", mutates_args=())
def gathered_grads(hidden: Tensor, weight: Tensor, idx: Tensor, g: Tensor,
                   offsets: Tensor | None, need_h: bool, need_w: bool,
                   need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dw, db) of logits gathered at idx whose gradient is g (compute dtype): token i's ids
    are row i of idx (N, K), or with ``offsets`` (N,) the flat idx (M,) from offsets[i] to the
    next token's start. dh_i = sum_j g_ij W[idx_ij] (N, D), dw[v] = sum_{ij : idx_ij = v} g_ij h_i
    (V, D), db[v] = sum_{ij : idx_ij = v} g_ij (V,). dh and dw in the weight's dtype where CUDA
    takes it as it is (16-bit: g rounded to it, float32 sums inside), else in g's; db in g's.
    Empty where not needed. Sorted sums, no atomics: the same bits from run to run."""
    w = weight if _mixed(weight) else weight.to(g.dtype)
    n = hidden.shape[0]
    flat, psw = idx.reshape(-1), g.to(w.dtype).reshape(-1)
    if offsets is None:
        offsets = torch.arange(0, flat.numel(), max(idx.shape[-1], 1), device=idx.device)
    # the ops behind F.embedding_bag(mode="sum") and its autograd formula for the weight
    dh, bags, sizes, maxes = torch.ops.aten._embedding_bag(w, flat, offsets, False, 0, False,
                                                            psw, False, -1)

    def scatter(rows, weights):  # sum_{ij : idx_ij = v} weights_ij rows_i
        return torch.ops.aten._embedding_bag_backward(rows, flat, offsets, bags, sizes, maxes,
                                                      w.shape[0], False, 0, False, weights, -1)

    dw = scatter(hidden.to(w.dtype), psw) if need_w else w.new_empty(0)
    db = scatter(g.new_ones(n, 1), g.reshape(-1))[:, 0] if need_b else g.new_empty(0)
    return (dh if need_h else w.new_empty(0)), dw, db


@gathered_grads.register_fake
def _(hidden, weight, idx, g, offsets, need_h, need_w, need_b):
    dt = weight.dtype if _mixed(weight) else g.dtype
    n, d = hidden.shape
    return (hidden.new_empty((n, d) if need_h else (0,), dtype=dt),
            weight.new_empty(weight.shape if need_w else (0,), dtype=dt),
            g.new_empty((weight.shape[0],) if need_b else (0,)))


class _GatherLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, idx, scale):
        cdt = compute_dtype(hidden.dtype)
        n, k = idx.shape
        live = idx >= 0
        safe = torch.where(live, idx, 0)
        out = torch.empty(n, k, dtype=cdt, device=hidden.device)
        step = _step(n, k, hidden.shape[1], cdt, hidden.device)
        for s in range(0, n, step):
            e = min(s + step, n)
            out[s:e] = _bmm(_rows(weight, safe[s:e], cdt), hidden[s:e, :, None], cdt)[..., 0]
        if bias is not None:
            out += bias.to(cdt)[safe]
        # where, not a product: a padded id's row may hold anything
        out = torch.where(live, out * scale, 0.0)
        ctx.save_for_backward(hidden, weight, bias, safe, live)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, weight, bias, safe, live = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = compute_dtype(hidden.dtype)
        g = torch.where(live, grad.to(cdt) * ctx.scale, 0.0)
        need_b = need_b and bias is not None
        dh, dw, db = gathered_grads(hidden, weight, safe, g, None, need_h, need_w, need_b)
        return (dh.to(hidden.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None,
                db.to(bias.dtype) if need_b else None, None, None)


def gather_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor,
                  scale: float = 1.0) -> Tensor:
    """Logits of each token at a few classes, differentiable w.r.t. hidden, weight and bias.

    Args:
        hidden: (N, D) float16/bfloat16/float32/float64. weight: (V, D) in hidden's dtype.
        bias: (V,) or None. idx: (N, K) int64 row indices into weight, or -1 (no class: the
            logit is 0 and gets no gradient). scale: multiplies the logits.

    Returns:
        (N, K) float32 (float64 for float64 inputs): ``scale * (hidden[i] . weight[idx[i, j]]
        + bias[idx[i, j]])``, 0 where idx is -1. The backward is deterministic (sorted sums,
        no atomics; see :func:`gathered_grads`).
    """
    with torch.autocast(hidden.device.type, enabled=False):
        return _GatherLogits.apply(hidden, weight, bias, idx, float(scale))
