"""Distillation kernels: both heads' logit tiles side by side, never an N x V tensor.

Forward (:func:`forward`): each program owns BLOCK_N tokens and one vocabulary split and streams
the student's and the teacher's logit tiles (the shared :func:`head_tile`: bulk loads on
Hopper) through online max/sum-exp statistics of both; for the KL forms it also accumulates,
online, sum_j exp(zt - m_t)(zt - zs) (forward KL) or sum_j exp(zs - m_s)(zs - zt) (reverse KL),
so one pass gives the divergence: KL(p||q) = sum_j p (zt - zs) - lse_t + lse_s. The generalized JSD
needs the normalized distributions inside log m, so a second pass (same kernel, PASS=2) sums
p (log p - log m) and q (log q - log m) once both lse are known.

The recompute backward (:mod:`.distill_backward`) recomputes both tiles per vocabulary chunk
from the statistics :func:`forward` keeps. This is the minimum-memory strategy
(``memory_budget=0``, and what the fused one, :mod:`.distill_fused`, does not cover).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import configs
from .common import head_tile, tma_descriptor

# Forward / dz kernel modes
FWD_KL, REV_KL, JSD = 0, 1, 2


@triton.jit
def _online(m, s, z):
    """One tile's update of a running max m and sum s of exp(z - m); returns (m, s, e, alpha)."""
    m_new = tl.maximum(m, tl.max(z, 1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    return m_new, s * alpha + tl.sum(e, 1), e, alpha


@triton.jit
def init_online(BLOCK_N: tl.constexpr):
    """Empty online (max, sum) pairs of the student, the teacher and the student at T = 1, in
    :func:`store_online`'s order."""
    ninf = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK_N,), tl.float32)
    return ninf, zero, ninf, zero, ninf, zero


@triton.jit
def store_online(base, stride_q, rmask, m_s, s_s, m_t, s_t, m_1, s_1):
    """A split's online (max, sum) pairs of the student, the teacher and the student at T = 1,
    one row vector every stride_q (the combine in :func:`_combine` reads them in this order)."""
    tl.store(base, m_s, mask=rmask)
    tl.store(base + stride_q, s_s, mask=rmask)
    tl.store(base + 2 * stride_q, m_t, mask=rmask)
    tl.store(base + 3 * stride_q, s_t, mask=rmask)
    tl.store(base + 4 * stride_q, m_1, mask=rmask)
    tl.store(base + 5 * stride_q, s_1, mask=rmask)


@triton.jit
def _log_mix(log_p, log_q, log_beta, log_1mbeta):
    """log(beta p + (1 - beta) q) = logaddexp(log p + log beta, log q + log(1 - beta))."""
    x = log_p + log_beta
    y = log_q + log_1mbeta
    mx = tl.maximum(x, y)
    return mx + tl.log(tl.exp(x - mx) + tl.exp(y - mx))


@triton.jit
def _fwd_kernel(
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
    lse_ptr,  # (>= 2, N) float32 lse_s, lse_t (read in pass 2)
    part_ptr,  # (8 | 2, splits, N) float32 out: per split acc_a, acc_b (| store_online's)
    N,
    V,
    Ds,
    Dt,
    stride_hs,
    stride_ws,
    stride_ht,
    stride_wt,
    tiles_per_split,  # vocabulary tiles per split
    n_row_blocks,
    cap_s,  # softcaps, 0: off
    cap_t,
    inv_temp,  # 1 / temperature
    temperature,
    log_beta,  # the JSD's log beta and log(1 - beta)
    log_1mbeta,
    MODE: tl.constexpr,  # FWD_KL, REV_KL or JSD
    PASS: tl.constexpr,  # 2: the JSD's sums, once both lse are known
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
):
    pid = tl.program_id(0)
    rb = pid % n_row_blocks  # token blocks fastest: concurrent programs share weight tiles
    split = pid // n_row_blocks
    n_splits = tl.num_programs(0) // n_row_blocks
    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ninf = float("-inf")
    m_s, s_s, m_t, s_t, m_1, s_1 = init_online(BLOCK_N)
    acc_a = tl.zeros((BLOCK_N,), tl.float32)
    acc_b = tl.zeros((BLOCK_N,), tl.float32)
    if NEED_CE:
        tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    if PASS == 2:
        lse_s = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        lse_t = tl.load(lse_ptr + N + rows, mask=rmask, other=0.0)
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for vt in range(t_lo, t_hi):
        cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < V
        zs, _ = head_tile(hs_ptr, ws_ptr, hs_desc, ws_desc, bs_ptr, rb * BLOCK_N, vt * BLOCK_V,
                          rows, cols, rmask, cmask, Ds, stride_hs, stride_ws, 1.0, cap_s,
                          inv_temp, HAS_BS, CAP_S, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION,
                          EVEN_KS, USE_TMA)
        zt, _ = head_tile(ht_ptr, wt_ptr, ht_desc, wt_desc, bt_ptr, rb * BLOCK_N, vt * BLOCK_V,
                          rows, cols, rmask, cmask, Dt, stride_ht, stride_wt, 1.0, cap_t,
                          inv_temp, HAS_BT, CAP_T, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION,
                          EVEN_KT, USE_TMA)
        if PASS == 1:
            zs_m = tl.where(cmask[None, :], zs, ninf)
            zt_m = tl.where(cmask[None, :], zt, ninf)
            gap = tl.where(cmask[None, :], zt - zs, 0.0)
            m_s, s_s, e_s, alpha_s = _online(m_s, s_s, zs_m)
            m_t, s_t, e_t, alpha_t = _online(m_t, s_t, zt_m)
            if MODE == 0:  # sum_j exp(zt - m_t) (zt - zs), rescaled with the teacher's max
                acc_a = acc_a * alpha_t + tl.sum(e_t * gap, 1)
            if MODE == 1:  # sum_j exp(zs - m_s) (zs - zt)
                acc_a = acc_a * alpha_s - tl.sum(e_s * gap, 1)
            if NEED_CE:  # the student's lse and target logit at temperature 1
                z1 = zs_m * temperature
                m_1, s_1, _, _ = _online(m_1, s_1, z1)
                acc_b += tl.sum(tl.where(cols[None, :] == tgt[:, None], zs * temperature, 0.0), 1)
        else:
            log_q = zs - lse_s[:, None]
            log_p = zt - lse_t[:, None]
            log_m = _log_mix(log_p, log_q, log_beta, log_1mbeta)
            acc_a += tl.sum(tl.where(cmask[None, :], tl.exp(log_p) * (log_p - log_m), 0.0), 1)
            acc_b += tl.sum(tl.where(cmask[None, :], tl.exp(log_q) * (log_q - log_m), 0.0), 1)
    base = part_ptr + split * N + rows
    stride_q = n_splits * N
    tl.store(base, acc_a, mask=rmask)
    tl.store(base + stride_q, acc_b, mask=rmask)
    if PASS == 1:
        store_online(base + 2 * stride_q, stride_q, rmask, m_s, s_s, m_t, s_t, m_1, s_1)


def descriptors(t, tma, hs, ws, ht, wt):
    """The four heads' operands as the kernels take them: tensor descriptors of (BLOCK_N,
    BLOCK_K) hidden and (BLOCK_V, BLOCK_K) weight tiles when ``tma``, else the tensors."""
    return [tma_descriptor(x, t.block_n if i % 2 == 0 else t.block_v, t.block_k) if tma else x
            for i, x in enumerate((hs, ws, ht, wt))]


def common_args(hs, ws, bs, ht, wt, bt, targets, beta, temperature, cap_s, cap_t):
    """(tile, the keyword arguments both kernels take): bulk (TMA) loads where the heads allow
    them and KernelConfig.distill_recompute_tma allows them (Hopper; on by default)."""
    kc = configs.current(hs.device)
    t = kc.tile("distill", hs.dtype)
    tma = kc.distill_recompute_tma and configs.use_tma(kc, hs, ws, ht, wt)
    hs_desc, ws_desc, ht_desc, wt_desc = descriptors(t, tma, hs, ws, ht, wt)
    return t, dict(
        hs_ptr=hs,
        ws_ptr=ws,
        bs_ptr=bs if bs is not None else hs,  # (a placeholder: its flag is off)
        ht_ptr=ht,
        wt_ptr=wt,
        bt_ptr=bt if bt is not None else ht,
        hs_desc=hs_desc,
        ws_desc=ws_desc,
        ht_desc=ht_desc,
        wt_desc=wt_desc,
        t_ptr=targets,
        N=hs.shape[0],
        V=ws.shape[0],
        Ds=hs.shape[1],
        Dt=ht.shape[1],
        stride_hs=hs.stride(0),
        stride_ws=ws.stride(0),
        stride_ht=ht.stride(0),
        stride_wt=wt.stride(0),
        n_row_blocks=triton.cdiv(hs.shape[0], t.block_n),
        cap_s=cap_s,
        cap_t=cap_t,
        inv_temp=1.0 / temperature,
        temperature=temperature,
        log_beta=math.log(beta) if 0.0 < beta < 1.0 else 0.0,
        log_1mbeta=math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0,
        HAS_BS=bs is not None,
        HAS_BT=bt is not None,
        CAP_S=cap_s > 0,
        CAP_T=cap_t > 0,
        BLOCK_N=t.block_n,
        BLOCK_V=t.block_v,
        BLOCK_K=t.block_k,
        UPCAST=configs.interpreting(),
        PRECISION=configs.dot_precision(hs.dtype),
        EVEN_KS=hs.shape[1] % t.block_k == 0,
        EVEN_KT=ht.shape[1] % t.block_k == 0,
        USE_TMA=tma,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )


def _splits(n_row_blocks, n_tiles, device):
    """Vocabulary splits per token block: about one program per SM at a time (two float32
    tiles each), so the time goes as waves x tiles per program: the loss's rule
    (:func:`configs.vocab_splits`, cached; KernelConfig.vocab_splits overrides both)
    without its minimum split count (one group of all token blocks)."""
    return configs.vocab_splits(n_row_blocks, n_tiles, device, group=n_row_blocks)


def _combine(m, s, a=None):
    """lse from per-split (max, sum-exp); with a (sum exp(z - m) x): also sum_j softmax_j x_j."""
    mx = m.amax(0)
    w = torch.exp(m - mx)
    tot = (s * w).sum(0)
    return mx + torch.log(tot), None if a is None else (a * w).sum(0) / tot


def forward(hs, ws, bs, ht, wt, bt, targets, mode, beta, temperature, cap_s, cap_t, need_ce):
    """Per-token statistics, (5, N) float32: lse_s, lse_t, k_p, k_q, lse_1 and the divergence
    D (N,) and the student's target logit at T = 1 (N,), where k_p = KL(p||q) (forward KL),
    k_q = KL(q||p) (reverse KL), or KL(p||m), KL(q||m) (JSD); lse_1 = student's lse at T = 1."""
    n, v = hs.shape[0], ws.shape[0]
    t, kernel_args = common_args(hs, ws, bs, ht, wt, bt, targets, beta, temperature, cap_s, cap_t)
    f32 = dict(device=hs.device, dtype=torch.float32)
    stats = torch.zeros((5, n), **f32)
    zt1 = torch.zeros(n, **f32)
    if n == 0:
        return stats, torch.zeros(0, **f32), zt1
    n_row_blocks = kernel_args["n_row_blocks"]
    n_tiles = triton.cdiv(v, t.block_v)
    n_splits = _splits(n_row_blocks, n_tiles, hs.device)
    per = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, per)
    part = torch.empty((8, n_splits, n), **f32)
    _fwd_kernel[(n_row_blocks * n_splits,)](
        **kernel_args,
        lse_ptr=stats,
        part_ptr=part,
        tiles_per_split=per,
        MODE=mode,
        PASS=1,
        NEED_CE=need_ce,
    )
    acc_a, acc_b, m_s, s_s, m_t, s_t, m_1, s_1 = part.unbind(0)
    lse_s, gap_q = _combine(m_s, s_s, acc_a if mode == REV_KL else None)
    lse_t, gap_p = _combine(m_t, s_t, acc_a if mode == FWD_KL else None)
    stats[0], stats[1] = lse_s, lse_t
    if need_ce:
        stats[4] = _combine(m_1, s_1)[0]
        zt1 = acc_b.sum(0)
    if mode == FWD_KL:
        stats[2] = d = gap_p - lse_t + lse_s
    elif mode == REV_KL:
        stats[3] = d = gap_q - lse_s + lse_t
    else:
        part2 = torch.empty((2, n_splits, n), **f32)
        _fwd_kernel[(n_row_blocks * n_splits,)](
            **kernel_args,
            lse_ptr=stats,
            part_ptr=part2,
            tiles_per_split=per,
            MODE=mode,
            PASS=2,
            NEED_CE=False,
        )
        stats[2], stats[3] = part2.sum(1)
        d = beta * stats[2] + (1.0 - beta) * stats[3]
    return stats, d, zt1
