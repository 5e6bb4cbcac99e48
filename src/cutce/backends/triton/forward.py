"""Forward: per-token log-sum-exp, sum of logits and E_p[z] in one pass (the target logit by a
small gather kernel beside it); on request (NEED_STATS, a compile-time flag: the loss's kernel is
unchanged) also the log-sum-exp of 2z and the first argmax, for the per-token metrics.

Each program owns BLOCK_N tokens and one contiguous split of the vocabulary; it streams the
weight tile by tile through an online max/sum-exp, so global memory receives O(N * splits) floats.
The vocabulary is split only as much as needed to fill the GPU (splits * token blocks ~ 2x SMs);
token blocks vary fastest in the launch order so that the programs running together read the
same weight tiles and L2 serves them. The splits are combined by a few O(N) torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .common import _tanh, head_tile, tma_descriptor


@triton.jit
def _forward_kernel(
    h_ptr,  # (N, D) hidden states
    w_ptr,  # (V, D) classifier weight
    h_desc,  # hidden's (BLOCK_N, BLOCK_K) tile descriptor (USE_TMA)
    w_desc,  # weight's (BLOCK_V, BLOCK_K) tile descriptor (USE_TMA)
    b_ptr,  # (V,) bias (HAS_BIAS)
    floor_ptr,  # (N,) a lower bound of each row's lse (BOUND)
    part_ptr,  # (4 | 6, splits, N) float32: per split m, s, zsum, a (| s2, argmax bits)
    ub_ptr,  # (V,) float32 class bounds, merged by atomic max (BOUND)
    cw_ptr,  # (V,) class weights (HAS_CW)
    zk_ptr,  # (N, >= V) kept logits less the row's target logit (KEEP)
    zk_desc,  # zk's (BLOCK_N, BLOCK_V) tile descriptor (KEEP_BULK)
    zt_ptr,  # (N,) float32 target logits
    rit_ptr,  # (N,) float32 per-row 1 / T (ROW_TEMP)
    N,
    V,
    D,
    stride_h,
    stride_w,
    stride_zk,
    tiles_per_split,  # vocabulary tiles per split
    n_row_blocks,
    group_rows,  # token blocks per launch group
    scale,
    softcap,  # 0: off
    inv_temp,  # 1 / temperature
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    NEED_ZSUM: tl.constexpr,
    NEED_ENT: tl.constexpr,  # sum_j p_j z_j
    BOUND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # float32 dots: the interpreter computes bf16 wrongly
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    FLATTEN: tl.constexpr,
    EVEN_V: tl.constexpr,
    HAS_CW: tl.constexpr,
    NEED_STATS: tl.constexpr,
    KEEP: tl.constexpr,
    KEEP_BULK: tl.constexpr,
    ROW_TEMP: tl.constexpr,
):
    # Programs go in groups of group_rows token blocks x all splits, token blocks fastest: the
    # programs running together read few hidden blocks (they stay in L2 while every weight
    # tile streams past them) and few weight tiles (each read once for the whole group).
    pid = tl.program_id(0)
    n_splits = tl.num_programs(0) // n_row_blocks
    g = pid // (group_rows * n_splits)
    first = g * group_rows
    rows_in_group = tl.minimum(group_rows, n_row_blocks - first)
    within = pid - first * n_splits
    rb = first + within % rows_in_group
    split = within // rows_in_group
    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zs = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    if BOUND:
        # A lower bound of each row's lse (its target logit; +inf for rows that take no part).
        floor = tl.load(floor_ptr + rows, mask=rmask, other=float("inf"))
    if ROW_TEMP:  # per-token temperatures: each row's logits times its own 1 / T
        rit = tl.load(rit_ptr + rows, mask=rmask, other=1.0)
    if KEEP:
        # The kept logits are stored relative to the row's target logit: the classes that carry
        # most of the softmax sit near it, and a 16-bit value near 0 keeps more of their digits.
        zt = tl.load(zt_ptr + rows, mask=rmask, other=0.0)
        zk_rows = zk_ptr + rows.to(tl.int64)[:, None] * stride_zk
    n_tiles = tl.cdiv(V, BLOCK_V)
    t_lo = split * tiles_per_split
    if NEED_STATS:
        # sum_j exp(z_j - m)^2 (rescaled by alpha^2 as s is by alpha), and the first column of
        # the running max: a tile's (first) argmax replaces it only if its max is strictly
        # larger, and the tiles come in increasing order, so ties keep the earliest column
        s2 = tl.zeros((BLOCK_N,), tl.float32)
        best = tl.zeros((BLOCK_N,), tl.int32) + t_lo * BLOCK_V
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for tile in tl.range(t_lo, t_hi, flatten=FLATTEN):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z, _ = head_tile(h_ptr, w_ptr, h_desc, w_desc, b_ptr, rb * BLOCK_N, tile * BLOCK_V, rows,
                         cols, rmask, cmask, D, stride_h, stride_w, scale, softcap, inv_temp,
                         HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION, EVEN_K,
                         USE_TMA)
        if ROW_TEMP:
            z = z * rit[:, None]
        if KEEP:  # (the strategy "keep", see cutce.engine.planner: the backward reads them back)
            if KEEP_BULK:  # a bulk store clips the ragged edges itself, with no 64-bit addresses
                zk_desc.store([rb * BLOCK_N, tile * BLOCK_V], (z - zt[:, None]).to(zk_desc.dtype))
            else:
                tl.store(zk_rows + cols[None, :], (z - zt[:, None]).to(zk_ptr.dtype.element_ty),
                         mask=rmask[:, None] & cmask[None, :])
        if EVEN_V:  # no class past V in any tile: no masking in the epilogue
            zm = z
        else:
            zm = tl.where(cmask[None, :], z, float("-inf"))
        if NEED_STATS:
            tile_max, tile_arg = tl.max(zm, 1, return_indices=True, return_indices_tie_break_left=True)
            best = tl.where(tile_max > m, tile * BLOCK_V + tile_arg, best)
            m_new = tl.maximum(m, tile_max)
        else:
            m_new = tl.maximum(m, tl.max(zm, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(zm - m_new[:, None])
        s = s * alpha + tl.sum(e, 1)
        if NEED_STATS:
            s2 = s2 * (alpha * alpha) + tl.sum(e * e, 1)
        if NEED_ENT or NEED_ZSUM:
            z0 = tl.where(cmask[None, :], z, 0.0)
            if NEED_ENT:
                a = a * alpha + tl.sum(e * z0, 1)
            if NEED_ZSUM:
                if HAS_CW:  # sum_j cw_j z_j: class-weighted label smoothing
                    cw = tl.load(cw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                    zs += tl.sum(z0 * cw[None, :], 1)
                else:
                    zs += tl.sum(z0, 1)
        if BOUND:
            # log p_ij = z_ij - lse_i <= z_ij - max(m_i so far, target logit): a per-class upper
            # bound of log-probability over this block's rows, merged by atomic max (order-free).
            lb = tl.maximum(m_new, floor)
            bound = tl.max(tl.where(rmask[:, None], zm - lb[:, None], float("-inf")), 0)
            tl.atomic_max(ub_ptr + cols, bound, mask=cmask)
        m = m_new
    base = part_ptr + split * N + rows
    stride_q = n_splits * N
    tl.store(base, m, mask=rmask)
    tl.store(base + stride_q, s, mask=rmask)
    tl.store(base + 2 * stride_q, zs, mask=rmask)
    tl.store(base + 3 * stride_q, a, mask=rmask)
    if NEED_STATS:
        tl.store(base + 4 * stride_q, s2, mask=rmask)
        # the int32 column rides in the float32 buffer bit for bit (read back by a view)
        tl.store(base + 5 * stride_q, best.to(tl.float32, bitcast=True), mask=rmask)


def forward(hidden, weight, bias, targets, scale, softcap, inv_temp, need_zsum, need_entropy,
            bound=False, n_splits=None, class_weight=None, bound_all_rows=False, need_stats=False,
            keep=None, row_inv_temp=None):
    """Launch the forward kernel.

    Args:
        hidden (N, D), weight (V, D), bias (V,) or None: float16/bfloat16/float32, contiguous rows.
        targets (N,) int64. scale, softcap (0 = off), inv_temp: the logit transform.
        bound: also return ub (V,) float32, an upper bound of max_i log softmax(z)_ij over the
            rows whose target is a class (filtering uses it), or over every row with
            ``bound_all_rows`` (a returned lse carries a gradient from ignored rows too).
        n_splits: vocabulary splits (None: enough to fill the device).
        class_weight: (V,) float or None: zsum becomes sum_j class_weight_j * z_j.
        need_stats: also return lse2 = logsumexp_j 2 z_j, zmax = max_j z_j (N,) float32 and
            amax = the first argmax_j z_j (N,) int64 (same pass; zsum is not implied here).
        keep: None, or an (N, >= V) 16-bit or float32 buffer that receives z - zt (each row's
            logits less its target logit) in its first V columns.
        row_inv_temp: None or (N,) float32: row i's logits are multiplied by it (after inv_temp).

    Returns:
        lse, zt, zsum, pz: (N,) float32; ub: (V,) float32 or an empty tensor; with need_stats,
        then lse2, zmax, amax.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    kc = configs.current(hidden.device)
    cfg = kc.tile("fwd", hidden.dtype)
    n_row_blocks = triton.cdiv(n, cfg.block_n)
    n_tiles = triton.cdiv(v, cfg.block_v)
    group_rows = configs.group_rows(cfg.block_n * d * hidden.element_size(), hidden.device)
    if n_splits is None:
        n_splits = configs.vocab_splits(n_row_blocks, n_tiles, hidden.device,
                                        min(n_row_blocks, group_rows))
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)
    f32 = dict(device=hidden.device, dtype=torch.float32)
    # with need_stats two more rows: s2 and the argmax (int32 bits: V < 2**31, as the tiles'
    # int32 offsets assume)
    part = torch.empty((6 if need_stats else 4, n_splits, n), **f32)
    if kc.poison:
        part.fill_(float("nan"))
    # Each row's target logit, by a separate gather kernel (summing it in the tiles' epilogue
    # cost one compare-select-reduce per tile element): zt, and the row's lse is at least that
    # (the bound's floor; +inf keeps rows without a target out of it, -inf lets the running max
    # alone bound them).
    zt_rows = target_logits(hidden, weight, bias, targets, scale, softcap, inv_temp, row_inv_temp)
    floor = None
    if bound:
        floor = torch.where((targets >= 0) & (targets < v), zt_rows,
                            float("-inf") if bound_all_rows else float("inf"))
    ub = torch.full((v,), float("-inf"), **f32) if bound else torch.empty(0, **f32)
    if n > 0:
        tma = configs.use_tma(kc, hidden, weight)
        h_desc = tma_descriptor(hidden, cfg.block_n, cfg.block_k) if tma else hidden
        w_desc = tma_descriptor(weight, cfg.block_v, cfg.block_k) if tma else weight
        keep_bulk = tma and keep is not None and keep.dtype == hidden.dtype
        keep_desc = tma_descriptor(keep[:, :v], cfg.block_n, cfg.block_v) if keep_bulk else part
        _forward_kernel[(n_row_blocks * n_splits,)](
            h_ptr=hidden,
            w_ptr=weight,
            h_desc=h_desc,
            w_desc=w_desc,
            b_ptr=bias if bias is not None else hidden,  # (a placeholder: its flag is off)
            floor_ptr=floor if bound else hidden,
            part_ptr=part,
            ub_ptr=ub,
            cw_ptr=class_weight if class_weight is not None else hidden,
            zk_ptr=keep if keep is not None else part,
            zk_desc=keep_desc,
            zt_ptr=zt_rows,
            rit_ptr=row_inv_temp if row_inv_temp is not None else part,
            N=n,
            V=v,
            D=d,
            stride_h=hidden.stride(0),
            stride_w=weight.stride(0),
            stride_zk=0 if keep is None else keep.stride(0),
            tiles_per_split=tiles_per_split,
            n_row_blocks=n_row_blocks,
            group_rows=group_rows,
            scale=scale,
            softcap=softcap,
            inv_temp=inv_temp,
            HAS_BIAS=bias is not None,
            SOFTCAP=softcap > 0,
            NEED_ZSUM=need_zsum,
            NEED_ENT=need_entropy,
            BOUND=bound,
            BLOCK_N=cfg.block_n,
            BLOCK_V=cfg.block_v,
            BLOCK_K=cfg.block_k,
            UPCAST=configs.interpreting(),
            PRECISION=configs.dot_precision(hidden.dtype),
            EVEN_K=d % cfg.block_k == 0,
            USE_TMA=tma,
            FLATTEN=tma and kc.flatten,
            EVEN_V=v % cfg.block_v == 0,
            HAS_CW=class_weight is not None,
            NEED_STATS=need_stats,
            KEEP=keep is not None,
            KEEP_BULK=keep_bulk,
            ROW_TEMP=row_inv_temp is not None,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    m, s, zs, a = part[:4].unbind(0)
    lse, pz = combine_splits(m, s, a)
    if not need_stats:
        return lse, zt_rows, zs.sum(0), pz, ub
    return (lse, zt_rows, zs.sum(0), pz, ub, *combine_stats(m, part[4], part[5].view(torch.int32)))


def combine_stats(m, s2, arg):
    """Per row, from its vocabulary splits' running max m, sum of exp(z - m)^2 s2 and first
    argmax arg (each (splits, N), splits in vocabulary order): logsumexp_j 2 z_j, max_j z_j and
    the first argmax_j z_j (int64), the split of the max with the smallest index winning ties."""
    mx = m.amax(0)
    lse2 = 2.0 * mx + torch.log((s2 * torch.exp(2.0 * (m - mx))).sum(0))
    first = (m == mx).to(torch.uint8).argmax(0, keepdim=True)  # the first split holding the max
    return lse2, mx, arg.gather(0, first)[0].to(torch.int64)


def combine_splits(m, s, a=None):
    """Per row, from its vocabulary splits' running max m, sum of exp(z - m) s and sum of
    exp(z - m) * z a (each (splits, N)): lse, and sum_j p_j z_j (None without a)."""
    mx = m.amax(0)
    w = torch.exp(m - mx)
    tot = (s * w).sum(0)
    return mx + torch.log(tot), None if a is None else (a * w).sum(0) / tot


@triton.jit
def _target_kernel(
    h_ptr,  # (N, D) hidden states
    w_ptr,  # (V, D) classifier weight
    b_ptr,  # (V,) bias (HAS_BIAS)
    t_ptr,  # (N,) or (N, K) int64 targets
    out_ptr,  # (N,) or (N, K) float32 target logits
    rit_ptr,  # (N,) float32 per-row 1 / T (ROW_TEMP)
    N,
    V,
    D,
    stride_h,
    stride_w,
    n_cols,  # K: targets and out (N, K), contiguous (1 for (N,))
    scale,
    softcap,  # 0: off
    inv_temp,  # 1 / temperature
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_TEMP: tl.constexpr,
):
    # The columns vary fastest: the programs running together read the same hidden rows.
    col = tl.program_id(0) % n_cols
    rows = (tl.program_id(0) // n_cols) * BLOCK_N + tl.arange(0, BLOCK_N)
    tgt = tl.load(t_ptr + rows.to(tl.int64) * n_cols + col, mask=rows < N, other=-1)
    valid = (rows < N) & (tgt >= 0) & (tgt < V)
    idx = tl.where(valid, tgt, 0).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        m = valid[:, None] & (ks < D)[None, :]
        a = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :], mask=m, other=0.0)
        b = tl.load(w_ptr + idx[:, None] * stride_w + ks[None, :], mask=m, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    acc = acc * scale
    if SOFTCAP:
        acc = _tanh(acc / softcap) * softcap
    acc = acc * inv_temp
    if ROW_TEMP:  # the tiles' order: scalar 1 / T first, then the row's
        acc = acc * tl.load(rit_ptr + rows, mask=rows < N, other=1.0)
    tl.store(out_ptr + rows.to(tl.int64) * n_cols + col, tl.where(valid, acc, 0.0), mask=rows < N)


def target_logits(hidden, weight, bias, targets, scale, softcap, inv_temp, row_inv_temp=None):
    """z[i, targets[i]] as float32 (N,), 0 where the target is not a class in [0, V): the
    float32 dot of the two rows, the same logit as the tiles' up to summation order
    (times row_inv_temp[i] when given). targets (N, K) contiguous: the (N, K) logits."""
    n, d = hidden.shape
    k = targets.shape[1] if targets.dim() == 2 else 1
    out = torch.empty(targets.shape, device=hidden.device, dtype=torch.float32)
    if n and k:
        block_n, block_k, warps = configs.current(hidden.device).target_tile
        _target_kernel[(triton.cdiv(n, block_n) * k,)](
            h_ptr=hidden,
            w_ptr=weight,
            b_ptr=bias if bias is not None else hidden,  # (a placeholder: its flag is off)
            t_ptr=targets,
            out_ptr=out,
            rit_ptr=row_inv_temp if row_inv_temp is not None else out,
            N=n,
            V=weight.shape[0],
            D=d,
            stride_h=hidden.stride(0),
            stride_w=weight.stride(0),
            n_cols=k,
            scale=scale,
            softcap=softcap,
            inv_temp=inv_temp,
            HAS_BIAS=bias is not None,
            SOFTCAP=softcap > 0,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            ROW_TEMP=row_inv_temp is not None,
            num_warps=warps,
        )
    return out
