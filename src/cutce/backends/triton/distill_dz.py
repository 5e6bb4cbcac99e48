"""The fused distillation's dz passes (:mod:`cutce.backends.triton.distill_fused`, step 3), in two forms.

:func:`_dz_kernel` recomputes the student's logit tile, one product per pass. With the student's
Xs = exp(z_s/T - ms) stored beside the teacher's X = exp(z_t/T - mt) by the statistics kernel
(the default: KernelConfig.distill_student_x; 16-bit, ms/mt each row's max over its vocabulary
tile, float32 rows x tiles tables), :func:`_dz_ew_kernel` needs no product: q = Xs exp(ms -
lse_s) and p = X exp(mt - lse_t), and each pass is one read of the two chunk x V buffers (and a
write of dz over X). The formulas are the same; calls with a CE term or a student
softcap keep the product form.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import configs
from .common import head_tile, log_fast


@triton.jit
def _dz_kernel(
    hs_ptr,  # (N, Ds) student hidden states
    ws_ptr,  # (V, Ds) student weight
    bs_ptr,  # (V,) student bias (HAS_BS)
    hs_desc,  # hs's (BLOCK_N, BLOCK_K) tile descriptor (USE_TMA)
    ws_desc,  # ws's (BLOCK_V, BLOCK_K) tile descriptor (USE_TMA)
    t_ptr,  # (N,) int64 targets (NEED_CE)
    x_ptr,  # (n1 - n0, >= V) the teacher's X; overwritten by dz in pass 2
    x_desc,  # x's (BLOCK_N, BLOCK_V) tile descriptor (TILE_STORE)
    tbl_ptr,  # (n1 - n0, tiles) float32 X's tile maxima
    st_ptr,  # (5, n1 - n0) float32 per row: lse_s, lse_t, lse_1, weight c, KL(q||m)
    sum_ptr,  # (2, n1 - n0, tiles) float32 out of pass 1: sum p d, sum q d
    n0,  # the chunk's rows n0:n1
    n1,
    V,
    Ds,
    stride_hs,
    stride_ws,
    stride_x,
    stride_tbl,
    n_row_blocks,
    cap_s,  # the student's softcap, 0: off
    inv_temp,  # 1 / temperature
    temperature,
    beta,  # the JSD's mixture weight
    ce_weight,
    MODE: tl.constexpr,  # FWD_KL or JSD (distill.py)
    PASS: tl.constexpr,  # 1: the JSD's row sums, 2: dz
    NEED_CE: tl.constexpr,
    HAS_BS: tl.constexpr,
    CAP_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # float32 dots: the interpreter computes bf16 wrongly
    PRECISION: tl.constexpr,
    EVEN_KS: tl.constexpr,
    USE_TMA: tl.constexpr,
    FLATTEN: tl.constexpr,
    TILE_STORE: tl.constexpr,
    FAST_LOG: tl.constexpr,
):
    # One tile per step; a persistent launch (fewer programs than tiles, DZ_PROGRAMS_PER_SM)
    # walks several, its software pipeline running on across them (the student's K is short).
    n_work = n_row_blocks * tl.cdiv(V, BLOCK_V)
    for w in tl.range(tl.program_id(0), n_work, tl.num_programs(0), flatten=FLATTEN):
        rb = w % n_row_blocks
        vt = w // n_row_blocks
        r0 = n0 + rb * BLOCK_N
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < n1
        r_loc = (rows - n0).to(tl.int64)
        cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < V
        zs, ts = head_tile(hs_ptr, ws_ptr, hs_desc, ws_desc, bs_ptr, r0, vt * BLOCK_V, rows,
                           cols, rmask, cmask, Ds, stride_hs, stride_ws, 1.0, cap_s, inv_temp,
                           HAS_BS, CAP_S, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION, EVEN_KS,
                           USE_TMA)
        rc = n1 - n0
        # per-row values of the chunk (see fused_total): lse_s, lse_t, lse_1, weight c, KL(q||m)
        lse_s = tl.load(st_ptr + r_loc, mask=rmask, other=0.0)[:, None]
        lse_t = tl.load(st_ptr + rc + r_loc, mask=rmask, other=0.0)[:, None]
        c = tl.load(st_ptr + 3 * rc + r_loc, mask=rmask, other=0.0)[:, None]
        omask = rmask[:, None] & cmask[None, :]
        if TILE_STORE:  # bulk load and store (KernelConfig.distill_tile_store): no tile of addresses
            x = x_desc.load([rb * BLOCK_N, vt * BLOCK_V]).to(tl.float32)
        else:
            xp = x_ptr + r_loc[:, None] * stride_x + cols[None, :]
            x = tl.load(xp, mask=omask, other=0.0).to(tl.float32)
        rel_t = tl.load(tbl_ptr + r_loc * stride_tbl + vt, mask=rmask, other=0.0)[:, None] - lse_t
        p = x * tl.exp(rel_t)
        log_q = zs - lse_s
        q = tl.exp(log_q)
        if MODE == 2:
            # m itself, then one log: two transcendentals per entry with q's exp, not five
            # through logaddexp (one program per SM runs its epilogue between its products, so
            # they added ~7 ms per pass at the Qwen pair). Where m is 0 so is q (beta < 1), and
            # p too up to an underflow: any finite log m gives their terms 0.
            m = beta * p + (1.0 - beta) * q
            log_m = log_fast(tl.where(m > 0, m, 1.0), FAST_LOG)
        if PASS == 1:  # the JSD's row sums, per (row, tile)
            # both through one d = log q - log m: KL(q||m) = sum q d, KL(p||m) = KL(p||q) +
            # sum p d (KL(p||q) from the forward's statistics). No log p per entry: its values
            # live beside d's spilled 1.2 KB of registers per thread on sm_90, and the pass
            # took twice the dz pass (3.2 vs 1.7 ms a chunk at the Qwen pair)
            d = tl.where(omask, log_q - log_m, 0.0)
            pd = tl.sum(p * d, 1)
            kq = tl.sum(q * d, 1)
            n_tiles = tl.cdiv(V, BLOCK_V)
            tl.store(sum_ptr + r_loc * n_tiles + vt, pd, mask=rmask)
            tl.store(sum_ptr + (rc + r_loc) * n_tiles + vt, kq, mask=rmask)
        else:
            if MODE == 2:
                k_q = tl.load(st_ptr + 4 * rc + r_loc, mask=rmask, other=0.0)[:, None]
                da = (1.0 - beta) * q * (log_q - log_m - k_q)
            else:
                da = q - p
            dz = da * (c * ((1.0 - ce_weight) * inv_temp))
            if NEED_CE:
                lse_1 = tl.load(st_ptr + 2 * rc + r_loc, mask=rmask, other=0.0)[:, None]
                tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
                onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
                dz += (c * ce_weight) * (tl.exp(zs * temperature - lse_1) - onehot)
            if CAP_S:
                dz = dz * (1.0 - ts * ts)
            # where, not a product: an ignored row (NaN hidden state included) adds nothing
            dz = tl.where(c != 0, dz, 0.0)
            if TILE_STORE:
                x_desc.store([rb * BLOCK_N, vt * BLOCK_V], dz.to(x_desc.dtype))
            else:
                tl.store(xp, dz.to(x_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _dz_ew_kernel(
    x_ptr,  # (R, >= V) the teacher's X; overwritten by dz in pass 2
    xs_ptr,  # (R, >= V) the student's Xs
    tbl_ptr,  # (R, tiles) float32 X's tile maxima
    tbls_ptr,  # (R, tiles) float32 Xs's tile maxima
    st_ptr,  # (5, R) float32 per row: lse_s, lse_t, lse_1, weight c, KL(q||m)
    sum_ptr,  # (2, R, tiles) float32 out of pass 1: sum p d, sum q d
    R,
    V,
    stride_x,  # (x's and xs's)
    stride_tbl,  # (tbl's and tbls's)
    inv_temp,  # 1 / temperature
    beta,  # the JSD's mixture weight
    MODE: tl.constexpr,  # FWD_KL or JSD (distill.py)
    PASS: tl.constexpr,  # 1: the JSD's row sums, 2: dz
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    FAST_LOG: tl.constexpr,
):
    vt = tl.program_id(1)  # BLOCK_V is the statistics kernel's: one table column per program
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    r = rows.to(tl.int64)
    cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
    omask = rmask[:, None] & (cols < V)[None, :]
    # per-row values (see fused_total): lse_s, lse_t, lse_1, weight c, KL(q||m)
    lse_s = tl.load(st_ptr + r, mask=rmask, other=0.0)
    lse_t = tl.load(st_ptr + R + r, mask=rmask, other=0.0)
    c = tl.load(st_ptr + 3 * R + r, mask=rmask, other=0.0)
    offs = r[:, None] * stride_x + cols[None, :]
    x = tl.load(x_ptr + offs, mask=omask, other=0.0).to(tl.float32)
    xs = tl.load(xs_ptr + offs, mask=omask, other=0.0).to(tl.float32)
    rel_t = tl.load(tbl_ptr + r * stride_tbl + vt, mask=rmask, other=0.0) - lse_t
    rel_s = tl.load(tbls_ptr + r * stride_tbl + vt, mask=rmask, other=0.0) - lse_s
    p = x * tl.exp(rel_t)[:, None]
    q = xs * tl.exp(rel_s)[:, None]
    if MODE == 2:  # where Xs underflowed q is 0 and so are its terms: any finite log q will do
        m = beta * p + (1.0 - beta) * q
        log_m = log_fast(tl.where(m > 0, m, 1.0), FAST_LOG)
        log_q = log_fast(tl.where(xs > 0, xs, 1.0), FAST_LOG) + rel_s[:, None]
    if PASS == 1:  # the JSD's row sums per (row, tile): sum p d and KL(q||m) = sum q d
        d = tl.where(omask, log_q - log_m, 0.0)
        n_tiles = tl.cdiv(V, BLOCK_V)
        tl.store(sum_ptr + r * n_tiles + vt, tl.sum(p * d, 1), mask=rmask)
        tl.store(sum_ptr + (R + r) * n_tiles + vt, tl.sum(q * d, 1), mask=rmask)
    else:
        if MODE == 2:
            k_q = tl.load(st_ptr + 4 * R + r, mask=rmask, other=0.0)
            da = (1.0 - beta) * q * (log_q - log_m - k_q[:, None])
        else:
            da = q - p
        dz = da * (c * inv_temp)[:, None]
        # where, not a product: an ignored row (NaN hidden state included) adds nothing
        dz = tl.where((c != 0)[:, None], dz, 0.0)
        tl.store(x_ptr + offs, dz.to(x_ptr.dtype.element_ty), mask=omask)


def dz_pass(x, xs, tbl, tbls, st, out, v, block_v, inv_temp, beta, mode, pass_):
    """One dz pass over a chunk of R rows: x, xs (R, >= v) 16-bit or float32 (the teacher's X,
    the student's Xs; x is overwritten by dz in pass 2), tbl, tbls (R, tiles) float32 tile
    maxima, st (5, R) float32 per-row values; pass 1 (the JSD's) writes out (2, R, tiles)
    float32 with sum p (log q - log m) and sum q (log q - log m) per (row, tile)."""
    r = x.shape[0]
    block_r, warps = configs.current(x.device).dz_ew_tile
    _dz_ew_kernel[(triton.cdiv(r, block_r), triton.cdiv(v, block_v))](
        x_ptr=x,
        xs_ptr=xs,
        tbl_ptr=tbl,
        tbls_ptr=tbls,
        st_ptr=st,
        sum_ptr=out,
        R=r,
        V=v,
        stride_x=x.stride(0),
        stride_tbl=tbl.stride(0),
        inv_temp=inv_temp,
        beta=beta,
        MODE=mode,
        PASS=pass_,
        BLOCK_R=block_r,
        BLOCK_V=block_v,
        FAST_LOG=not configs.interpreting(),
        num_warps=warps,
    )
