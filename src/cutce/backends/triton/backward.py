"""Backward: dE, dC, dbias from recomputed logits, exact and deterministic by default.

Per token chunk x vocabulary chunk, a persistent Triton kernel recomputes the logit tiles and
writes the logit gradient dz into a workspace (chunk_n x chunk_v, the gradient's dtype); then
full-K cuBLAS GEMMs use it: dE[chunk] += dz @ C[chunk] accumulated in float32, and
dC[chunk] = dz^T @ E written once. Work: three N x D x V matmuls. No atomics, so bitwise
reproducible. Memory (workspace.py): the workspace lives in dC's unwritten rows while it fits,
half of the float32 dE accumulator in dE's own rows; the rest comes from a budget (a fraction of
the gradients' size). When the accumulator outgrows it, tokens are chunked too and dC is
accumulated over token chunks in its own dtype (one rounding per token chunk).

Filtering (opt-in): the forward bounds every class's largest log-probability over the valid
rows; classes whose bound is below log(eps) (and that are no row's target) are skipped entirely,
the rest are processed exactly; when most classes are kept, all are, densely.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...engine import chunks
from . import configs, workspace
from .common import head_tile, tma_descriptor


@triton.jit
def dz_tile(z, t, rows, cls, rmask, cmask, t_ptr, lse_ptr, pz_ptr, glse_ptr, gzt_ptr, gzs_ptr,
            gpz_ptr, cw_ptr, scale, inv_temp, SOFTCAP: tl.constexpr, NEED_ZSUM: tl.constexpr,
            NEED_ENT: tl.constexpr, HAS_CW: tl.constexpr):
    """The gradient w.r.t. the raw products h . w of a tile whose logits are z (and tanh t under
    softcap), given the rows' lse, sum_j p_j z_j and the upstream gradients of lse, the target
    logit, sum_j (c_j) z_j and sum_j p_j z_j: float32 (BLOCK_N, BLOCK_V)."""
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
        gzs = tl.load(gzs_ptr + rows, mask=rmask, other=0.0)[:, None]
        if HAS_CW:
            dz += gzs * tl.load(cw_ptr + cls, mask=cmask, other=0.0).to(tl.float32)[None, :]
        else:
            dz += gzs
    if SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = dz * (scale * inv_temp)
    return dz


@triton.jit
def _dz_kernel(
    h_ptr,  # (N, D) hidden states
    w_ptr,  # (V, D) classifier weight
    h_desc,  # hidden's (BLOCK_N, BLOCK_K) tile descriptor (USE_TMA)
    w_desc,  # weight's (BLOCK_V, BLOCK_K) tile descriptor (USE_TMA)
    b_ptr,  # (V,) bias (HAS_BIAS)
    cls_ptr,  # (kept classes,) ascending class indices (GATHER)
    t_ptr,  # (N,) int64 targets
    lse_ptr,  # (N,) float32
    pz_ptr,  # (N,) float32 sum_j p_j z_j (NEED_ENT)
    glse_ptr,  # (N,) float32 upstream gradients of lse, zt, zsum, pz
    gzt_ptr,
    gzs_ptr,
    gpz_ptr,
    cw_ptr,  # (V,) class weights (HAS_CW)
    dz_ptr,  # (n1 - n0, >= c1 - c0) the chunk's logit gradient
    rit_ptr,  # (N,) float32 per-row 1 / T (ROW_TEMP)
    n0,  # the chunk's rows n0:n1 and classes (or kept-class slots) c0:c1
    n1,
    c0,
    c1,
    D,
    stride_h,
    stride_w,
    stride_dz,
    scale,
    softcap,  # 0: off
    inv_temp,  # 1 / temperature
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    NEED_ZSUM: tl.constexpr,
    NEED_ENT: tl.constexpr,
    GATHER: tl.constexpr,  # the filtered backward: classes from cls_ptr
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # float32 dots: the interpreter computes bf16 wrongly
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    FLATTEN: tl.constexpr,
    HAS_CW: tl.constexpr,
    ROW_TEMP: tl.constexpr,
):
    # Persistent: each program walks tiles pid, pid + programs, ...; row blocks vary fastest, so
    # the programs running together share the chunk's weight tiles in L2.
    n_row_blocks = tl.cdiv(n1 - n0, BLOCK_N)
    n_tiles = n_row_blocks * tl.cdiv(c1 - c0, BLOCK_V)
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=FLATTEN):
        rb = tile % n_row_blocks
        cb = tile // n_row_blocks
        rows = n0 + rb * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n1
        jj = cb * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = jj < c1 - c0
        if GATHER:
            cls = tl.load(cls_ptr + c0 + jj, mask=cmask, other=0)
        else:
            cls = c0 + jj
        # (USE_TMA never with GATHER: the classes are contiguous)
        z, t = head_tile(h_ptr, w_ptr, h_desc, w_desc, b_ptr, n0 + rb * BLOCK_N, c0 + cb * BLOCK_V,
                         rows, cls, rmask, cmask, D, stride_h, stride_w, scale, softcap, inv_temp,
                         HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION, EVEN_K,
                         USE_TMA)
        if ROW_TEMP:  # per-token temperatures, as the forward: z and dz scale by the row's 1 / T
            rit = tl.load(rit_ptr + rows, mask=rmask, other=1.0)[:, None]
            z = z * rit
        dz = dz_tile(z, t, rows, cls, rmask, cmask, t_ptr, lse_ptr, pz_ptr, glse_ptr, gzt_ptr,
                     gzs_ptr, gpz_ptr, cw_ptr, scale, inv_temp, SOFTCAP, NEED_ZSUM, NEED_ENT,
                     HAS_CW)
        if ROW_TEMP:
            dz = dz * rit
        # Pointer stores: a bulk (TMA) store measured slower on the H200 (its 64 KB staging
        # buffer cost more than it saved: 4.54x vs 4.43x fwd+bwd at the Gemma shape).
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


def _mm_f32(a, b, out=None):
    """a @ b with a float32 result and float32 accumulation (no 16-bit rounding of it)."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    r = a.float() @ b.float()  # CPU (the interpreter's tests): no mixed-dtype mm there
    return r if out is None else out.copy_(r)


def _kept_classes(ub, targets, eps, dense_fraction):
    """Classes the filtered backward must visit, ascending (bound >= log(eps), or some row's
    target); None when they are most of the vocabulary (the dense path is then faster, and
    exact). One host sync (the count) per backward."""
    v = ub.numel()
    valid = (targets >= 0) & (targets < v)
    hit = torch.zeros(v + 1, dtype=torch.bool, device=ub.device)
    hit[torch.where(valid, targets, v)] = True  # slot v collects the rows with no target
    keep = hit[:v] | (ub >= math.log(eps))
    cls = torch.nonzero(keep).squeeze(1)
    return None if cls.numel() > dense_fraction * v else cls


def backward(hidden, weight, bias, targets, lse, pz, ub, g_lse, g_zt, g_zsum, g_pz,
             scale, softcap, inv_temp, need_zsum, need_entropy, filter_eps,
             need_h, need_w, need_b, plan, class_weight=None, row_inv_temp=None):
    """Gradients of (lse, zt, zsum, pz) w.r.t. hidden, weight, bias given their upstream grads.
    ``row_inv_temp``: None or (N,) float32 per-row factors of the logits (after inv_temp).

    ``plan``: the call's :class:`~cutce.engine.planner.Plan`: its chunk (where the budget holds
    the preferred one), else its workspace bytes, within which the chunks are sized here for the
    classes this backward visits (:func:`cutce.engine.chunks.recompute_chunks`); whether dC's
    running sum over token chunks may be a float32 V x D accumulator.

    Returns (dh, dw, db) in the inputs' dtypes; a gradient that is not needed is an empty tensor
    of its own (a custom op's outputs may not alias each other).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dt = hidden.dtype
    dev = hidden.device
    kc = configs.current(dev)
    cfg = kc.tile("bwd_entropy" if need_entropy else "bwd", dt)

    def empty():
        return hidden.new_empty(0)

    cls = None
    n_cls = v
    if ub.numel():  # the forward computed class bounds: filtering was asked for
        cls = _kept_classes(ub, targets, filter_eps, kc.filter_dense_fraction)
        n_cls = v if cls is None else cls.numel()
    # Exact: every row of dC is written by its chunk's GEMM (no zero fill needed); filtered: the
    # skipped classes' rows stay zero.
    f32 = dt == torch.float32
    dh = (torch.zeros_like(hidden) if f32 else torch.empty_like(hidden)) if need_h else empty()
    dw = (torch.empty_like(weight) if cls is None and n > 0 else torch.zeros_like(weight)) \
        if need_w else empty()
    db32 = torch.zeros(v, device=dev, dtype=torch.float32) if need_b else empty()
    if kc.poison:  # what the backward leaves unwritten shows up as NaN
        if need_h and not f32:
            dh.fill_(float("nan"))
        if need_w and cls is None and n > 0:
            dw.fill_(float("nan"))
    if n == 0 or n_cls == 0 or not (need_h or need_w or need_b):
        if need_h and not f32:
            dh.zero_()
        return dh, dw, (db32.to(bias.dtype) if need_b else empty())
    tail = need_w and cls is None and dw.is_contiguous()  # dC rows written once, in order
    if cls is None and plan.chunk_n:
        split = False  # a whole float32 dE chunk: one product per vocabulary chunk, not two
        cap_n, cap_v = kc.recompute_chunk_cap or (plan.chunk_n, plan.chunk_v)
        chunk_n = min(n, plan.chunk_n, cap_n)
        chunk_v = min(triton.cdiv(n_cls, cfg.block_v) * cfg.block_v, plan.chunk_v, cap_v)
    else:
        split = workspace.splits_hidden_acc(dh, need_h)
        chunk_n, chunk_v = workspace_chunks(n, n_cls, v, d, dt, need_h, need_w, split, tail,
                                            cls is not None, cfg.block_v, kc, plan.workspace)
    acc = workspace.HiddenGradAccumulator(dh, chunk_n, split) if need_h and not f32 else None
    # dC's running sum over token chunks: float32 when the budget allows, else dC itself
    dw_sum = dw
    if need_w and not f32 and chunk_n < n and plan.dc_f32:
        dw_sum = torch.zeros(dw.shape, device=dev, dtype=torch.float32) if cls is not None \
            else torch.empty(dw.shape, device=dev, dtype=torch.float32)
    ws_dtype = configs.workspace_dtype(kc, dt)  # the GPU's rounding in CPU tests, see configs
    space = workspace.DzWorkspace(chunk_n, chunk_v, ws_dtype, dev,
                                  dw if tail and chunk_n == n else None, cfg.block_v, kc)
    tma = cls is None and configs.use_tma(kc, hidden, weight)
    h_desc = tma_descriptor(hidden, cfg.block_n, cfg.block_k) if tma else hidden
    w_desc = tma_descriptor(weight, cfg.block_v, cfg.block_k) if tma else weight
    # Flattening pipelines descriptor loads across tiles; with pointer loads (gathered classes)
    # it stalled every K step: 30 ms instead of ~1 ms for 7% of Gemma's classes (H200).
    flat = tma and kc.flatten
    for n0 in range(0, n, chunk_n):
        n1 = min(n0 + chunk_n, n)
        parts = acc.parts(n0, n1) if acc is not None else [(dh[n0:n1], 0, d)]
        c0 = 0
        while c0 < n_cls:
            dz, width = space.next(c0, n_cls, n1 - n0)
            c1 = c0 + width
            tiles = triton.cdiv(n1 - n0, cfg.block_n) * triton.cdiv(width, cfg.block_v)
            _dz_kernel[(configs.persistent_programs(tiles, dev, kc.dz_programs_per_sm),)](
                h_ptr=hidden,
                w_ptr=weight,
                h_desc=h_desc,
                w_desc=w_desc,
                b_ptr=bias if bias is not None else hidden,  # (a placeholder: its flag is off)
                cls_ptr=cls if cls is not None else targets,
                t_ptr=targets,
                lse_ptr=lse,
                pz_ptr=pz,
                glse_ptr=g_lse,
                gzt_ptr=g_zt,
                gzs_ptr=g_zsum,
                gpz_ptr=g_pz,
                cw_ptr=class_weight if class_weight is not None else lse,
                dz_ptr=dz,
                rit_ptr=row_inv_temp if row_inv_temp is not None else lse,
                n0=n0,
                n1=n1,
                c0=c0,
                c1=c1,
                D=d,
                stride_h=hidden.stride(0),
                stride_w=weight.stride(0),
                stride_dz=dz.stride(0),
                scale=scale,
                softcap=softcap,
                inv_temp=inv_temp,
                HAS_BIAS=bias is not None,
                SOFTCAP=softcap > 0,
                NEED_ZSUM=need_zsum,
                NEED_ENT=need_entropy,
                GATHER=cls is not None,
                BLOCK_N=cfg.block_n,
                BLOCK_V=cfg.block_v,
                BLOCK_K=cfg.block_k,
                UPCAST=configs.interpreting(),
                PRECISION=configs.dot_precision(dt),
                EVEN_K=d % cfg.block_k == 0,
                USE_TMA=tma,
                FLATTEN=flat,
                HAS_CW=class_weight is not None,
                ROW_TEMP=row_inv_temp is not None,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
            dz = dz.to(dt)
            w_chunk = weight[c0:c1] if cls is None else weight.index_select(0, cls[c0:c1])
            h_chunk = hidden[n0:n1]
            if need_h:
                for out, k0, k1 in parts:
                    _accumulate_f32(out, dz, w_chunk[:, k0:k1])
            if need_w:
                _accumulate_dw(dw_sum, cls, c0, c1, dz, h_chunk, first=(n0 == 0))
            if need_b:
                part = dz.sum(0, dtype=torch.float32)
                if cls is None:
                    db32[c0:c1] += part
                else:
                    db32.index_add_(0, cls[c0:c1], part)  # unique indices: order-free
            c0 = c1
        if acc is not None:
            acc.finish(n0, n1)
    if dw_sum is not dw:
        dw.copy_(dw_sum)
    return dh, dw, (db32.to(bias.dtype) if need_b else empty())


def workspace_chunks(n, n_cls, v, d, dtype, need_h, need_w, split, tail, gather, block_v, kc,
                     budget):
    """(chunk_n, chunk_v) within the plan's workspace bytes (:func:`cutce.engine.chunks.recompute_chunks`
    with this kernel's tile and KernelConfig's vocabulary-chunk limits)."""
    if configs.interpreting():
        return n, 2 * block_v  # several chunks even at test sizes
    return chunks.recompute_chunks(n, n_cls, v, d, dtype, need_h, need_w, split, tail, gather,
                                   block_v, kc.min_chunk_v, kc.max_chunk_v, budget)


def _accumulate_dw(dw, cls, c0, c1, dz, h_chunk, first):
    """dC rows of this vocabulary chunk (+)= dz^T @ E: rounded once per token chunk when dw is
    16-bit, never when it is a float32 accumulator of 16-bit operands."""
    mixed = dw.dtype != dz.dtype
    if cls is None:
        rows = dw[c0:c1]
        if first:
            _mm_f32(dz.T, h_chunk, out=rows) if mixed else torch.mm(dz.T, h_chunk, out=rows)
        elif mixed:
            _accumulate_f32(rows, dz.T, h_chunk)
        else:
            rows.addmm_(dz.T, h_chunk)
        return
    idx = cls[c0:c1]
    part = _mm_f32(dz.T, h_chunk) if mixed else torch.mm(dz.T, h_chunk)
    if first:
        dw.index_copy_(0, idx, part)
    else:  # unique indices: each row is added once, so the order cannot change the result
        dw.index_add_(0, idx, part)


class HiddenGrad:
    """dE's float32 running sum over vocabulary chunks at half a float32 copy's memory (the
    distillation's recompute backward, :mod:`.distill`): for
    16-bit hidden states with an even D, the first D/2 columns' float32 sums live in dE's own
    bytes (N x D 16-bit values are N x D/2 float32 ones), the other half in a buffer."""

    def __init__(self, h):
        n, d = h.shape
        self.split = h.dtype != torch.float32 and d % 2 == 0
        self.out = torch.zeros(h.shape, device=h.device,
                               dtype=h.dtype if self.split else torch.float32)
        self.parts = [(self.out, 0, d)]
        self.extra_bytes = 0 if self.split else n * d * 2 * (h.dtype != torch.float32)
        if self.split:
            hi = torch.zeros((n, d - d // 2), device=h.device, dtype=torch.float32)
            self.parts = [(self.out.view(torch.float32), 0, d // 2), (hi, d // 2, d)]
            self.extra_bytes = hi.numel() * 4

    def add(self, z, w):
        for acc, k0, k1 in self.parts:
            _accumulate_f32(acc, z, w[:, k0:k1])

    def result(self, step):
        """dE in its dtype; ``step`` rows at a time (their float32 temporary is the peak)."""
        if self.split:
            (lo, _, _), (hi, _, _) = self.parts
            h = lo.shape[1]
            for r0 in range(0, lo.shape[0], step):
                # rows r0:r1 of the result take exactly the bytes of lo's rows r0:r1, which
                # are read (into a 16-bit temporary) before they are written
                r1 = r0 + step
                first = lo[r0:r1].to(self.out.dtype)
                self.out[r0:r1, h:] = hi[r0:r1]
                self.out[r0:r1, :h] = first
        return self.out
