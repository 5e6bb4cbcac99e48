"""Backward: dE, dC, dbias from recomputed logits, exact and deterministic by default.

Per token chunk x vocabulary chunk, a Triton kernel recomputes the logit tiles and writes the
logit gradient dz into a bounded workspace (chunk_n x chunk_v, the gradient's dtype); then two
full-K cuBLAS GEMMs use it: dE[chunk] += dz @ C[chunk] accumulated in float32, and
dC[chunk] = dz^T @ E written once. Work: three N x D x V matmuls. No atomics, so bitwise
reproducible. Memory: the workspace plus a float32 dE accumulator, sized together from a budget
(a fraction of the gradients' own size); when the float32 dE alone exceeds it, tokens are chunked
too and dC is accumulated over token chunks in its own dtype (one rounding per token chunk).

Filtering (opt-in): the forward bounds every class's largest log-probability over the valid
rows; classes whose bound is below log(eps) (and that are no row's target) are skipped entirely,
the rest are processed exactly, in decreasing order of the bound.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import configs
from .common import logit_tile


@triton.jit
def _dz_kernel(h_ptr, w_ptr, b_ptr, cls_ptr, t_ptr, lse_ptr, pz_ptr, glse_ptr, gzt_ptr, gzs_ptr,
               gpz_ptr, dz_ptr, n0, n1, c0, c1, D, stride_h, stride_w, stride_dz,
               scale, softcap, inv_temp,
               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, NEED_ZSUM: tl.constexpr,
               NEED_ENT: tl.constexpr, GATHER: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr, EVEN_K: tl.constexpr):
    # Row blocks vary fastest: programs running together share the chunk's weight tiles in L2.
    n_row_blocks = tl.cdiv(n1 - n0, BLOCK_N)
    pid = tl.program_id(0)
    rb = pid % n_row_blocks
    cb = pid // n_row_blocks
    rows = n0 + rb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n1
    jj = cb * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = jj < c1 - c0
    if GATHER:
        cls = tl.load(cls_ptr + c0 + jj, mask=cmask, other=0)
    else:
        cls = c0 + jj
    z, t = logit_tile(h_ptr, w_ptr, b_ptr, rows, cls, rmask, cmask, D, stride_h, stride_w,
                      scale, softcap, inv_temp, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K,
                      UPCAST, PRECISION, EVEN_K)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(glse_ptr + rows, mask=rmask, other=0.0)
    p = tl.exp(z - lse[:, None])
    if NEED_ENT:
        pz = tl.load(pz_ptr + rows, mask=rmask, other=0.0)
        gp = tl.load(gpz_ptr + rows, mask=rmask, other=0.0)
        # d(sum_j p_j z_j)/dz_k = p_k (1 + z_k - sum_j p_j z_j)
        dz = p * (g[:, None] + gp[:, None] * (1.0 + z - pz[:, None]))
    else:
        dz = p * g[:, None]
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    gt = tl.load(gzt_ptr + rows, mask=rmask, other=0.0)
    dz += tl.where(cls[None, :] == tgt[:, None], gt[:, None], 0.0)
    if NEED_ZSUM:
        dz += tl.load(gzs_ptr + rows, mask=rmask, other=0.0)[:, None]
    if SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = dz * (scale * inv_temp)
    out = dz_ptr + (rows - n0).to(tl.int64)[:, None] * stride_dz + jj[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _accumulate_f32(acc, a, b):
    """acc += a @ b with float32 accumulation and no rounding of the product to a's dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # the interpreter path: CPU has no mixed-dtype addmm
        acc.addmm_(a.float(), b.float())


def _chunk_sizes(n, v, d, dtype, need_h, block_v):
    """(chunk_n, chunk_v) so that the workspace and the float32 dE accumulator fit the budget."""
    elt = torch.finfo(dtype).bits // 8
    grads = (n + v) * d * elt
    budget = max(configs.BACKWARD_MEMORY_FRACTION * grads, 16 * 2**20)
    acc_per_row = d * 4 if (need_h and dtype != torch.float32) else 0
    if configs.interpreting():
        return n, 2 * block_v  # several chunks even at test sizes
    chunk_v = configs.MIN_CHUNK_V
    chunk_n = n
    if n * (acc_per_row + chunk_v * elt) > budget:
        chunk_n = max(configs.forward_tile(dtype).block_n,
                      int(budget // (acc_per_row + chunk_v * elt)))
    else:
        chunk_v = int((budget - n * acc_per_row) // (n * elt))
    chunk_v = max(configs.MIN_CHUNK_V, chunk_v // block_v * block_v)
    return min(chunk_n, n), min(chunk_v, triton.cdiv(v, block_v) * block_v)


def _kept_classes(ub, targets, eps):
    """Classes the filtered backward must visit: bound >= log(eps) or some row's target, in
    decreasing order of the bound. One host sync (the count) per backward."""
    v = ub.numel()
    valid = (targets >= 0) & (targets < v)
    hit = torch.zeros(v + 1, dtype=torch.bool, device=ub.device)
    hit[torch.where(valid, targets, v)] = True  # slot v collects the rows with no target
    key = torch.where(hit[:v], float("inf"), ub)
    order = torch.sort(key, descending=True, stable=True).indices
    kept = int((key >= math.log(eps)).sum())
    return order[:kept]


def backward(hidden, weight, bias, targets, lse, pz, ub, g_lse, g_zt, g_zsum, g_pz,
             scale, softcap, inv_temp, need_zsum, need_entropy, filter_eps,
             need_h, need_w, need_b):
    """Gradients of (lse, zt, zsum, pz) w.r.t. hidden, weight, bias given their upstream grads.

    Returns (dh, dw, db) in the inputs' dtypes; a gradient that is not needed is an empty tensor.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dt = hidden.dtype
    dev = hidden.device
    cfg = configs.backward_tile(dt)
    empty = hidden.new_empty(0)
    dh = torch.zeros_like(hidden) if need_h else empty
    dw = torch.zeros_like(weight) if need_w else empty
    db32 = torch.zeros(v, device=dev, dtype=torch.float32) if need_b else empty
    cls = None
    n_cls = v
    if ub.numel():  # the forward computed class bounds: filtering was asked for
        cls = _kept_classes(ub, targets, filter_eps)
        n_cls = cls.numel()
    if n == 0 or n_cls == 0 or not (need_h or need_w or need_b):
        return dh, dw, (db32.to(bias.dtype) if need_b else empty)
    chunk_n, chunk_v = _chunk_sizes(n, n_cls, d, dt, need_h, cfg.block_v)
    dh32 = torch.zeros((chunk_n, d), device=dev, dtype=torch.float32) if need_h and dt != torch.float32 else None
    # The interpreter truncates float32 -> bfloat16 instead of rounding to nearest as the GPU
    # does: let it write float32 and round with torch, so CPU tests see the GPU's rounding.
    ws = torch.empty((chunk_n, chunk_v), device=dev,
                     dtype=torch.float32 if configs.interpreting() else dt)
    if configs.POISON:
        ws.fill_(float("nan"))
    for n0 in range(0, n, chunk_n):
        n1 = min(n0 + chunk_n, n)
        acc = dh[n0:n1] if dh32 is None else dh32[: n1 - n0].zero_()
        for c0 in range(0, n_cls, chunk_v):
            c1 = min(c0 + chunk_v, n_cls)
            dz = ws[: n1 - n0, : c1 - c0]
            grid = (triton.cdiv(n1 - n0, cfg.block_n) * triton.cdiv(c1 - c0, cfg.block_v),)
            _dz_kernel[grid](
                hidden, weight, bias if bias is not None else hidden,
                cls if cls is not None else targets, targets, lse, pz, g_lse, g_zt, g_zsum, g_pz,
                dz, n0, n1, c0, c1, d, hidden.stride(0), weight.stride(0), dz.stride(0),
                scale, softcap, inv_temp,
                HAS_BIAS=bias is not None, SOFTCAP=softcap > 0, NEED_ZSUM=need_zsum,
                NEED_ENT=need_entropy, GATHER=cls is not None, BLOCK_N=cfg.block_n,
                BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, UPCAST=configs.interpreting(),
                PRECISION=configs.dot_precision(dt), EVEN_K=d % cfg.block_k == 0,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            dz = dz.to(dt)
            w_chunk = weight[c0:c1] if cls is None else weight.index_select(0, cls[c0:c1])
            h_chunk = hidden[n0:n1]
            if need_h:
                _accumulate_f32(acc, dz, w_chunk)
            if need_w:
                _accumulate_dw(dw, cls, c0, c1, dz, h_chunk, first=(n0 == 0))
            if need_b:
                part = dz.sum(0, dtype=torch.float32)
                if cls is None:
                    db32[c0:c1] += part
                else:
                    db32.index_add_(0, cls[c0:c1], part)  # unique indices: order-free
        if dh32 is not None:
            dh[n0:n1] = acc
    return dh, dw, (db32.to(bias.dtype) if need_b else empty)


def _accumulate_dw(dw, cls, c0, c1, dz, h_chunk, first):
    """dC rows of this vocabulary chunk (+)= dz^T @ E, rounded once per token chunk."""
    if cls is None:
        rows = dw[c0:c1]
        if first:
            torch.mm(dz.T, h_chunk, out=rows)
        else:
            rows.addmm_(dz.T, h_chunk)
        return
    idx = cls[c0:c1]
    part = torch.mm(dz.T, h_chunk)
    if not first:
        part += dw.index_select(0, idx)
    dw.index_copy_(0, idx, part)
