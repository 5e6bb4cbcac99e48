"""Fused distillation strategy: the student's gradients formed in the forward, teacher computed once.

For reduction "mean"/"sum" with a frozen teacher every row's weight c_i is known in the forward,
so (as the loss's fused strategy, :mod:`cutce.engine.planner`) each chunk of tokens is finished there:

1. :func:`_stats_kernel` (row blocks x vocabulary splits) computes both heads' logit tiles, the
   online log-sum-exps of both (and at T = 1 for the CE term), Σ p (z_t - z_s) (hence
   KL(p||q)), and stores the teacher's X_ij = exp(z_t,ij - mt_i,tile) in 16 bits, where mt is
   the row's max over the tile (kept in a float32 rows x tiles table): X <= 1 never overflows,
   and once lse_t is known p_ij = X_ij exp(mt_i,tile - lse_t,i), exact up to X's 16-bit
   rounding. With KernelConfig.distill_student_x it stores the student's Xs the same way.
2. The splits' statistics are combined per row (lse_s, lse_t, lse_1, the divergence).
3. The dz passes (:mod:`cutce.backends.triton.distill_dz`) write dz_s = c_i ((1 - w)/T (q - p) +
   w (softmax(z_s) - onehot)) (times the softcap's derivative) over X, in X's bytes, from a
   recomputed student tile (a quarter of the teacher's product at the Qwen 7B -> 0.5B pair) or,
   with Xs stored, elementwise. For the JSD a first pass sums Σ p d and Σ q d per row,
   d = log q - log m: KL(q||m) (its gradient needs it) and KL(p||m) = KL(p||q) + Σ p d.
4. cuBLAS: dE[chunk] = dz @ W_s (float32 result, rounded once), dC += dz^T @ E[chunk] (float32
   accumulator across chunks, cast once at the end), dbias += column sums of dz.

The backward only scales the gradients by the upstream scalar (:func:`cutce.engine.planner.fused_backward`).
Products of N x Ds x V (the student's): 4 + 1 (stats) + 1 (dz) + 2 (dE, dC) = 8 for the forward
KL, 9 for the JSD (7 for both with Xs stored), against 12 and 17 for the recompute kernels
(:mod:`cutce.backends.triton.distill`). The reverse KL stays there: its gradient q (log q - log p - D)
needs log p to any depth, which a 16-bit X cannot give where p underflows (the JSD's log m is
bounded by log q + log(1 - beta)).

Memory beyond the student's gradients (:func:`cutce.engine.planner.distill_extra_bytes`): X, chunk x V 16-bit values, in dC's
own bytes while chunk <= Ds (dC is only written at the end), the float32 dC accumulator
(V x Ds x 4 bytes, with more than one chunk and 16-bit weights), the tile-max table and dE's
float32 chunk result (chunk x Ds x 4); Xs and its table too when stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, distill_dz
from .backward import _accumulate_f32, _mm_f32
from .common import head_tile, tma_descriptor
from .distill import (FWD_KL, _combine, _online, _splits, descriptors, init_online,
                      store_online)
from ...engine.planner import v_pad
from .elementwise import copy_cast_


@triton.jit
def _store_tile(x_ptr, x_desc, x, rb, vt, r_loc, cols, rmask, cmask, stride_x,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, TILE_STORE: tl.constexpr):
    """A (BLOCK_N, BLOCK_V) tile into a chunk x V buffer, rows r_loc, columns cols."""
    if TILE_STORE:  # bulk store (KernelConfig.distill_tile_store): clips the ragged edges itself
        x_desc.store([rb * BLOCK_N, vt * BLOCK_V], x.to(x_desc.dtype))
    else:
        omask = rmask[:, None] & cmask[None, :]
        tl.store(x_ptr + r_loc[:, None] * stride_x + cols[None, :],
                 x.to(x_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _x_online(m, s, z):
    """One tile's X = exp(z - mt), mt its rows' max, and the running (max m, sum s of exp(z - m))
    updated from X's own exponentials; returns (m, s, X, mt, alpha, beta) with the new sum
    s = alpha s_old + beta rowsum(X)."""
    mt = tl.max(z, 1)
    x = tl.exp(z - mt[:, None])
    m_new = tl.maximum(m, mt)
    alpha = tl.exp(m - m_new)
    beta = tl.exp(mt - m_new)
    return m_new, s * alpha + tl.sum(x, 1) * beta, x, mt, alpha, beta


@triton.jit
def _stats_kernel(
    hs_ptr,  # (N, Ds) student hidden states
    ws_ptr,  # (V, Ds) student weight
    bs_ptr,  # (V,) student bias (HAS_BS)
    ht_ptr,  # (N, Dt) teacher hidden states
    wt_ptr,  # (V, Dt) teacher weight
    bt_ptr,  # (V,) teacher bias (HAS_BT)
    hs_desc,  # the four operands' (BLOCK_N | BLOCK_V, BLOCK_K) tile descriptors (USE_TMA)
    ws_desc,
    ht_desc,
    wt_desc,
    t_ptr,  # (N,) int64 targets (NEED_CE)
    x_ptr,  # (n1 - n0, >= V) out: the teacher's X
    x_desc,  # x's (BLOCK_N, BLOCK_V) tile descriptor (TILE_STORE)
    tbl_ptr,  # (n1 - n0, tiles) float32 out: X's tile maxima
    xs_ptr,  # (n1 - n0, >= V) out: the student's Xs (STORE_S)
    xs_desc,  # xs's (BLOCK_N, BLOCK_V) tile descriptor (TILE_STORE and STORE_S)
    tbls_ptr,  # (n1 - n0, tiles) float32 out: Xs's tile maxima (STORE_S)
    part_ptr,  # (8, splits, n1 - n0) float32 out: per split gap, zt1, then store_online's
    n0,  # the chunk's rows n0:n1
    n1,
    V,
    Ds,
    Dt,
    stride_hs,
    stride_ws,
    stride_ht,
    stride_wt,
    stride_x,  # (x's and xs's)
    stride_tbl,  # (tbl's and tbls's)
    tiles_per_split,  # vocabulary tiles per split
    n_row_blocks,
    cap_s,  # softcaps, 0: off
    cap_t,
    inv_temp,  # 1 / temperature
    temperature,
    NEED_CE: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    CAP_S: tl.constexpr,
    CAP_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # float32 dots: the interpreter computes bf16 wrongly
    PRECISION: tl.constexpr,
    EVEN_KS: tl.constexpr,
    EVEN_KT: tl.constexpr,
    USE_TMA: tl.constexpr,
    TILE_STORE: tl.constexpr,
    STORE_S: tl.constexpr,  # also the student's Xs (KernelConfig.distill_student_x)
):
    pid = tl.program_id(0)
    rb = pid % n_row_blocks  # token blocks fastest: concurrent programs share weight tiles
    split = pid // n_row_blocks
    n_splits = tl.num_programs(0) // n_row_blocks
    r0 = n0 + rb * BLOCK_N
    rows = r0 + tl.arange(0, BLOCK_N)
    rmask = rows < n1
    r_loc = (rows - n0).to(tl.int64)
    ninf = float("-inf")
    m_s, s_s, m_t, s_t, m_1, s_1 = init_online(BLOCK_N)
    gap = tl.zeros((BLOCK_N,), tl.float32)
    zt1 = tl.zeros((BLOCK_N,), tl.float32)
    if NEED_CE:
        tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for vt in range(t_lo, t_hi):
        cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < V
        zs, _ = head_tile(hs_ptr, ws_ptr, hs_desc, ws_desc, bs_ptr, r0, vt * BLOCK_V, rows, cols,
                          rmask, cmask, Ds, stride_hs, stride_ws, 1.0, cap_s, inv_temp, HAS_BS,
                          CAP_S, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION, EVEN_KS, USE_TMA)
        zt, _ = head_tile(ht_ptr, wt_ptr, ht_desc, wt_desc, bt_ptr, r0, vt * BLOCK_V, rows, cols,
                          rmask, cmask, Dt, stride_ht, stride_wt, 1.0, cap_t, inv_temp, HAS_BT,
                          CAP_T, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION, EVEN_KT, USE_TMA)
        zs_m = tl.where(cmask[None, :], zs, ninf)
        zt_m = tl.where(cmask[None, :], zt, ninf)
        if STORE_S:  # the student's Xs too, as the teacher's X below (distill_student_x)
            m_s, s_s, xs, ms, _, _ = _x_online(m_s, s_s, zs_m)
            _store_tile(xs_ptr, xs_desc, xs, rb, vt, r_loc, cols, rmask, cmask, stride_x,
                        BLOCK_N, BLOCK_V, TILE_STORE)
            tl.store(tbls_ptr + r_loc * stride_tbl + vt, ms, mask=rmask)
        else:
            m_s, s_s, _, _ = _online(m_s, s_s, zs_m)
        m_t, s_t, x, mt, alpha, beta_ = _x_online(m_t, s_t, zt_m)
        # sum_j exp(zt - m_t) (zt - zs): KL(p||q) = its mean under p - lse_t + lse_s, the forward
        # KL itself and the JSD's KL(p||m) = KL(p||q) + sum p (log q - log m) (see _dz_kernel)
        gap = gap * alpha + tl.sum(x * tl.where(cmask[None, :], zt - zs, 0.0), 1) * beta_
        if NEED_CE:  # the student's lse and target logit at temperature 1
            m_1, s_1, _, _ = _online(m_1, s_1, zs_m * temperature)
            zt1 += tl.sum(tl.where(cols[None, :] == tgt[:, None], zs * temperature, 0.0), 1)
        _store_tile(x_ptr, x_desc, x, rb, vt, r_loc, cols, rmask, cmask, stride_x, BLOCK_N,
                    BLOCK_V, TILE_STORE)
        tl.store(tbl_ptr + r_loc * stride_tbl + vt, mt, mask=rmask)
    rc = n1 - n0
    base = part_ptr + split * rc + r_loc
    stride_q = n_splits * rc
    tl.store(base, gap, mask=rmask)
    tl.store(base + stride_q, zt1, mask=rmask)
    store_online(base + 2 * stride_q, stride_q, rmask, m_s, s_s, m_t, s_t, m_1, s_1)


# ---- plan inputs (the plan itself is cutce.engine.planner's) ----------------------------------

def stores_student_x(ce_weight: float, cap_s: float, device=None) -> bool:
    """Whether a fused call may store the student's Xs for elementwise dz passes
    (KernelConfig.distill_student_x; calls with a CE term or a student softcap recompute
    instead). Every preset stores them: the device only matters under an override."""
    return configs.current(device).distill_student_x and ce_weight <= 0 and cap_s == 0


# ---- launcher --------------------------------------------------------------------------------

def _flags(kc, t, hs, ws, ht, wt, bs, bt, cap_s, cap_t):
    tma = configs.use_tma(kc, hs, ws, ht, wt)
    return tma, dict(
        HAS_BS=bs is not None,
        CAP_S=cap_s > 0,
        BLOCK_N=t.block_n,
        BLOCK_V=t.block_v,
        BLOCK_K=t.block_k,
        UPCAST=configs.interpreting(),
        PRECISION=configs.dot_precision(hs.dtype),
        EVEN_KS=hs.shape[1] % t.block_k == 0,
        USE_TMA=tma,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )


def fused_total(hs, ws, bs, ht, wt, bt, targets, coef, mode, beta, temperature, cap_s, cap_t,
                ce_weight, chunk, x_in_dc, xs, need_h, need_w, need_b):
    """sum_i coef_i loss_i and its gradients w.r.t. the student's head, formed in the forward.

    Args: hs (N, Ds), ws (V, Ds), bs (V,) or None; ht (N, Dt), wt (V, Dt), bt (V,) or None (one
    dtype, bfloat16 or float32; float16 in the interpreter's tests), unit inner strides; targets
    (N,) int64 (any value where ce_weight is 0); coef (N,) float32, 0 for ignored rows; mode
    FWD_KL or JSD; chunk: tokens per chunk; x_in_dc: X may live in dC's bytes; xs: store the
    student's Xs for elementwise dz passes (only without a CE term or student softcap; see plan).

    Returns (total 0-dim float32, rows (N,) float32 per-token losses, dhs, dws, dbs in the
    inputs' dtypes, empty where not needed), as distill_total's recompute path computes them.
    """
    n, ds = hs.shape
    v = ws.shape[0]
    dt = hs.dtype
    dev = hs.device
    kc = configs.current(dev)
    t = kc.tile("distill_fused", dt)
    f32 = dict(device=dev, dtype=torch.float32)
    rows_out = torch.empty(n, **f32)  # every chunk writes its rows
    dh = torch.empty_like(hs) if need_h else hs.new_empty(0)
    dw = torch.empty_like(ws) if need_w else hs.new_empty(0)
    db32 = torch.zeros(v, **f32) if need_b else None
    n_chunks = -(-n // chunk) if n else 0
    acc = None  # dC's running sum: float32 across chunks (dw itself for float32 weights)
    if need_w and n_chunks > 1:
        acc = dw if dt == torch.float32 else torch.empty((v, ds), **f32)
    x_dtype = configs.workspace_dtype(kc, dt)
    rows_max = min(chunk, n)
    in_place = (x_in_dc and acc is not None and acc is not dw and x_dtype == dt
                and rows_max * v_pad(v) <= v * ds)
    if in_place:  # dC is written only at the end, from the accumulator
        x_all = dw.view(-1)[: rows_max * v_pad(v)].view(rows_max, v_pad(v))
    else:
        x_all = torch.empty((rows_max, v_pad(v)), device=dev, dtype=x_dtype)
    n_tiles = triton.cdiv(v, t.block_v)
    tbl_all = torch.empty((rows_max, n_tiles), **f32)
    need_ce = ce_weight > 0
    # the student's Xs too (the plan's xs): elementwise dz passes, one more buffer
    student_x = xs
    assert not (xs and (need_ce or cap_s)), "Xs serve calls without a CE term or student softcap"
    xs_all, tbls_all = (torch.empty_like(x_all), torch.empty_like(tbl_all)) if student_x \
        else (x_all, tbl_all)
    if kc.poison:
        for b in (x_all, tbl_all, xs_all, tbls_all):
            b.fill_(float("nan"))
    tma, kw = _flags(kc, t, hs, ws, ht, wt, bs, bt, cap_s, cap_t)
    store = tma and kc.distill_tile_store and configs.use_tma(kc, x_all, xs_all)
    descs = descriptors(t, tma, hs, ws, ht, wt)
    bs_, bt_ = (bs if bs is not None else hs), (bt if bt is not None else ht)
    for n0 in range(0, n, chunk):
        n1 = min(n0 + chunk, n)
        rc = n1 - n0
        x, tbl, xs, tbls = x_all[:rc], tbl_all[:rc], xs_all[:rc], tbls_all[:rc]
        n_row_blocks = triton.cdiv(rc, t.block_n)
        n_splits = _splits(n_row_blocks, n_tiles, dev)
        per = triton.cdiv(n_tiles, n_splits)
        n_splits = triton.cdiv(n_tiles, per)
        part = torch.empty((8, n_splits, rc), **f32)
        x_desc, xs_desc = (tma_descriptor(b[:, :v], t.block_n, t.block_v) if store else b
                           for b in (x, xs))
        # the arguments both kernels take: the student's head, the chunk's X and its table
        chunk_args = dict(
            hs_ptr=hs,
            ws_ptr=ws,
            bs_ptr=bs_,
            hs_desc=descs[0],
            ws_desc=descs[1],
            t_ptr=targets,
            x_ptr=x,
            x_desc=x_desc,
            tbl_ptr=tbl,
            n0=n0,
            n1=n1,
            V=v,
            Ds=ds,
            stride_hs=hs.stride(0),
            stride_ws=ws.stride(0),
            stride_x=x.stride(0),
            stride_tbl=tbl.stride(0),
            n_row_blocks=n_row_blocks,
            cap_s=cap_s,
            inv_temp=1.0 / temperature,
            temperature=temperature,
            TILE_STORE=store,
            **kw,
        )
        _stats_kernel[(n_row_blocks * n_splits,)](
            **chunk_args,
            ht_ptr=ht,
            wt_ptr=wt,
            bt_ptr=bt_,
            ht_desc=descs[2],
            wt_desc=descs[3],
            xs_ptr=xs,
            xs_desc=xs_desc,
            tbls_ptr=tbls,
            part_ptr=part,
            Dt=ht.shape[1],
            stride_ht=ht.stride(0),
            stride_wt=wt.stride(0),
            tiles_per_split=per,
            cap_t=cap_t,
            NEED_CE=need_ce,
            HAS_BT=bt is not None,
            CAP_T=cap_t > 0,
            EVEN_KT=ht.shape[1] % t.block_k == 0,
            STORE_S=student_x,
        )
        gap, zt1, m_s, s_s, m_t, s_t, m_1, s_1 = part.unbind(0)
        st = torch.zeros((5, rc), **f32)  # lse_s, lse_t, lse_1, coef, KL(q||m): the dz kernel's
        st[0] = _combine(m_s, s_s)[0]
        st[1], mean_gap = _combine(m_t, s_t, gap)
        kl_pq = mean_gap - st[1] + st[0]
        st[3] = coef[n0:n1]
        # one program per tile unless distill_dz_programs_per_sm asks for a persistent launch
        grid = (configs.persistent_programs(n_row_blocks * n_tiles, dev,
                                            kc.distill_dz_programs_per_sm),)
        # one tile per program: no loop to flatten (today's code, measured)
        flat = tma and kc.flatten and grid[0] < n_row_blocks * n_tiles

        def dz_pass(out, pass_):
            if student_x:
                distill_dz.dz_pass(x, xs, tbl, tbls, st, out, v, t.block_v, 1.0 / temperature,
                                   beta, mode, pass_)
            else:
                distill_dz._dz_kernel[grid](
                    **chunk_args,
                    st_ptr=st,
                    sum_ptr=out,
                    beta=beta,
                    ce_weight=ce_weight,
                    MODE=mode,
                    PASS=pass_,
                    NEED_CE=need_ce and pass_ == 2,
                    FLATTEN=flat,
                    FAST_LOG=not configs.interpreting(),
                )
        if mode == FWD_KL:
            d = kl_pq
        else:
            sums = torch.empty((2, rc, n_tiles), **f32)
            dz_pass(sums, 1)
            p_d, st[4] = sums.sum(-1)
            d = beta * (kl_pq + p_d) + (1.0 - beta) * st[4]
        if need_ce:
            st[2] = _combine(m_1, s_1)[0]
            d = (1.0 - ce_weight) * d + ce_weight * (st[2] - zt1.sum(0))
        rows_out[n0:n1] = d
        dz_pass(st, 2)
        dz = x[:, :v]
        if need_h:
            if x_dtype == dt == torch.float32:
                torch.mm(dz, ws, out=dh[n0:n1])
            else:
                dh[n0:n1] = _mm_f32(dz, ws)  # float32 result, rounded once
        if need_w:
            h = hs[n0:n1]
            if acc is None:  # one chunk: its product is the gradient, rounded once
                torch.mm(dz.T, h, out=dw) if x_dtype == dt else dw.copy_(_mm_f32(dz.T, h))
            elif n0 == 0:
                _mm_f32(dz.T, h, out=acc) if acc is not dw else torch.mm(dz.T, h, out=acc)
            else:
                _accumulate_f32(acc, dz.T, h)
        if need_b:
            db32 += dz.sum(0, dtype=torch.float32)
    if acc is not None and acc is not dw:
        copy_cast_(dw, acc)  # X (in dC's bytes) is dead now
    total = torch.where(coef != 0, rows_out * coef, 0.0).sum()
    db = db32.to(bs.dtype) if need_b else hs.new_empty(0)
    return total, rows_out, dh, dw, db
