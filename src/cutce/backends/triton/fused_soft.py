"""Soft targets in the fused strategy (:mod:`cutce.backends.triton.fused`): a total with a term
``- sum_j a_ij z_{i, ids_ij}`` over a few class ids per token, for the stored-teacher
distillation (:mod:`cutce.sparse_distill`), whose K teacher ids act as K weighted targets.

The term's gradient, dz_ij = -a_ij at the ids, joins X before the chunk's GEMMs: its entries at
the ids are rewritten, as the epilogue rewrites the target's, from float32 values:

    dz_ij = scale * f_ij * (g_i * exp(z_ij - lse_i) - a_ij - k1_i [ids_ij = t_i]),   X_ij = dz_ij / s_i

(g_i = k0_i + 2 k3_i lse_i, f the softcap's derivative, z_ij from the gather kernel), so the dE
and dC products that the cross-entropy runs anyway carry it: O(N K) work beyond the loss, where
gathering the K logits with autograd costs an (N, K, D) product each way and a scattered dC.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Rows and ids per program of the rewrite.
SOFT_ROWS, SOFT_COLS = 32, 32


@triton.jit
def _soft_entries_kernel(
    x_ptr,  # (n1 - n0, >= V) X: its entries at the ids rewritten
    ids_ptr,  # (N, K) int64 class ids; outside [0, V): none
    a_ptr,  # (N, K) float32 their coefficients a
    z_ptr,  # (N, K) float32 the logits at the ids
    t_ptr,  # (N,) int64 targets
    k_ptr,  # (4, N) float32 the rows' coefficients k0..k3
    lse_ptr,  # (N,) float32
    s_ptr,  # (n1 - n0,) float32 the rows' scales s
    n0,  # the chunk's rows n0:n1
    n1,
    V,
    K,
    stride_x,
    stride_k,
    scale,
    softcap,  # 0: off
    SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    rows = n0 + tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    rmask = rows < n1
    at = rows.to(tl.int64)[:, None] * K + js[None, :]
    inside = rmask[:, None] & (js < K)[None, :]
    ids = tl.load(ids_ptr + at, mask=inside, other=-1)
    ok = inside & (ids >= 0) & (ids < V)
    a = tl.load(a_ptr + at, mask=ok, other=0.0)
    z = tl.load(z_ptr + at, mask=ok, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    k0 = tl.load(k_ptr + rows, mask=rmask, other=0.0)
    k1 = tl.load(k_ptr + stride_k + rows, mask=rmask, other=0.0)
    k3 = tl.load(k_ptr + 3 * stride_k + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    s = tl.load(s_ptr + rows - n0, mask=rmask, other=0.0)
    g = k0 + 2.0 * k3 * lse
    # the target's own -k1 where it is one of the ids: this entry replaces the epilogue's
    a = a + tl.where(ids == tgt[:, None], k1[:, None], 0.0)
    if SOFTCAP:
        f = 1.0 - (z / softcap) * (z / softcap)
    else:
        f = 1.0
    dz = scale * f * (g[:, None] * tl.exp(z - lse[:, None]) - a)
    live = s != 0  # an ignored row's X is 0, and so stays
    x = tl.where(live[:, None], dz / tl.where(live, s, 1.0)[:, None], 0.0)
    out = x_ptr + (rows - n0).to(tl.int64)[:, None] * stride_x + tl.where(ok, ids, 0)
    tl.store(out, x.to(x_ptr.dtype.element_ty), mask=ok & live[:, None])


def rewrite_entries(x, ids, a, z, targets, coef, lse, s, n0, n1, v, scale, softcap):
    """X's entries of rows n0:n1 (x: the chunk's, V = v classes) at the soft ids, once the chunk
    epilogue wrote lse and s. ids, a, z: (N, K) contiguous."""
    k = ids.shape[1]
    _soft_entries_kernel[(triton.cdiv(n1 - n0, SOFT_ROWS), triton.cdiv(k, SOFT_COLS))](
        x_ptr=x,
        ids_ptr=ids,
        a_ptr=a,
        z_ptr=z,
        t_ptr=targets,
        k_ptr=coef,
        lse_ptr=lse,
        s_ptr=s,
        n0=n0,
        n1=n1,
        V=v,
        K=k,
        stride_x=x.stride(0),
        stride_k=coef.stride(0),
        scale=scale,
        softcap=softcap,
        SOFTCAP=softcap > 0,
        BLOCK_R=SOFT_ROWS,
        BLOCK_J=SOFT_COLS,
        num_warps=4,
    )

