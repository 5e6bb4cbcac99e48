"""The "keep" strategy's backward (see cutce.engine.planner): the forward stored every logit
(less its row's target logit, in the inputs' dtype); the backward turns them into the logit
gradient in place, by one elementwise pass, and hands that to cuBLAS:

    dz  = dz_tile(z)                 (N, V) over the kept buffer's own bytes
    dE  = dz @ C                     (N, D)
    dC  = dz^T @ E                   (V, D)
    db  = dz.sum(0)

Three N x D x V products in all (the forward's and these two) where recompute takes four, for
N x V 16-bit values held from the forward to the backward. The buffer is consumed: a second
backward through the same call (retain_graph) recomputes the logits instead (ops.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...engine import planner
from . import configs
from .backward import dz_tile


@triton.jit
def _kept_dz_kernel(
    zk_ptr,  # (N, >= V) kept logits less the target logit; overwritten by dz
    zt_ptr,  # (N,) float32 target logits
    t_ptr,  # (N,) int64 targets
    lse_ptr,  # (N,) float32
    pz_ptr,  # (N,) float32 sum_j p_j z_j (NEED_ENT)
    glse_ptr,  # (N,) float32 upstream gradients of lse, zt, zsum, pz
    gzt_ptr,
    gzs_ptr,
    gpz_ptr,
    cw_ptr,  # (V,) class weights (HAS_CW)
    rit_ptr,  # (N,) float32 per-row 1 / T (ROW_TEMP)
    N,
    V,
    stride_zk,
    scale,
    softcap,  # 0: off
    inv_temp,  # 1 / temperature
    SOFTCAP: tl.constexpr,
    NEED_ZSUM: tl.constexpr,
    NEED_ENT: tl.constexpr,
    HAS_CW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ROW_TEMP: tl.constexpr,
):
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    rows = (pid % n_row_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (pid // n_row_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = cols < V
    mask = rmask[:, None] & cmask[None, :]
    ptr = zk_ptr + rows.to(tl.int64)[:, None] * stride_zk + cols[None, :]
    zt = tl.load(zt_ptr + rows, mask=rmask, other=0.0)
    z = tl.load(ptr, mask=mask, other=0.0).to(tl.float32) + zt[:, None]
    t = z
    if ROW_TEMP:  # (the kept z already carries each row's 1 / T)
        rit = tl.load(rit_ptr + rows, mask=rmask, other=1.0)[:, None]
    if SOFTCAP:  # z = softcap * tanh(y / softcap) / temperature
        if ROW_TEMP:
            t = z / (softcap * inv_temp * rit)
        else:
            t = z / (softcap * inv_temp)
    dz = dz_tile(z, t, rows, cols, rmask, cmask, t_ptr, lse_ptr, pz_ptr, glse_ptr, gzt_ptr,
                 gzs_ptr, gpz_ptr, cw_ptr, scale, inv_temp, SOFTCAP, NEED_ZSUM, NEED_ENT, HAS_CW)
    if ROW_TEMP:
        dz = dz * rit
    tl.store(ptr, dz.to(zk_ptr.dtype.element_ty), mask=mask)


def buffer(n, v, dtype, device):
    """The kept logits' buffer: (N, V) with rows padded to 16 bytes (cuBLAS operands)."""
    kc = configs.current(device)
    ws = configs.workspace_dtype(kc, dtype)
    out = torch.empty((n, planner.kept_width(v, ws)), device=device, dtype=ws)
    if kc.poison:
        out.fill_(float("nan"))
    return out


def backward(kept, hidden, weight, bias, targets, zt, lse, pz, g_lse, g_zt, g_zsum, g_pz, scale,
             softcap, inv_temp, need_zsum, need_entropy, need_h, need_w, need_b,
             class_weight=None, row_inv_temp=None):
    """(dh, dw, db) from the kept logits (consumed); None for a gradient not asked for.
    ``row_inv_temp``: None or (N,) float32 per-row factors of the logits (after inv_temp)."""
    n = hidden.shape[0]
    v = weight.shape[0]
    if n > 0:
        block_n, block_v, warps = configs.current(hidden.device).kept_tile
        grid = (triton.cdiv(n, block_n) * triton.cdiv(v, block_v),)
        _kept_dz_kernel[grid](
            zk_ptr=kept,
            zt_ptr=zt,
            t_ptr=targets,
            lse_ptr=lse,
            pz_ptr=pz,
            glse_ptr=g_lse,
            gzt_ptr=g_zt,
            gzs_ptr=g_zsum,
            gpz_ptr=g_pz,
            cw_ptr=class_weight if class_weight is not None else lse,
            rit_ptr=row_inv_temp if row_inv_temp is not None else lse,
            N=n,
            V=v,
            stride_zk=kept.stride(0),
            scale=scale,
            softcap=softcap,
            inv_temp=inv_temp,
            SOFTCAP=softcap > 0,
            NEED_ZSUM=need_zsum,
            NEED_ENT=need_entropy,
            HAS_CW=class_weight is not None,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            ROW_TEMP=row_inv_temp is not None,
            num_warps=warps,
        )
    dz = kept[:, :v].to(hidden.dtype)  # (a copy only in the interpreter's float32 workspace)
    dh = torch.mm(dz, weight) if need_h else None
    dw = torch.mm(dz.T, hidden) if need_w else None
    db = dz.sum(0, dtype=torch.float32).to(bias.dtype) if need_b else None
    return dh, dw, db
