"""The distillation's recompute backward (the forward and the statistics it keeps are in
:mod:`cutce.backends.triton.distill`): per vocabulary chunk, a kernel recomputes both tiles and
writes the student's logit gradient (and the teacher's, if it requires grad) into an N x chunk_v
workspace; cuBLAS forms dE += dz @ C (float32 sums, half in dE's own bytes) and dC[chunk] =
dz^T @ E, each row written once (all tokens in one product). Memory beyond the gradients: within
the workspace every recompute backward has (:func:`cutce.engine.chunks.workspace_floor`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...engine import chunks
from . import configs
from .backward import HiddenGrad, _mm_f32
from .common import head_tile
from .distill import _log_mix, common_args


@triton.jit
def _dz_kernel(
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
    st_ptr,  # (5, N) float32 the forward's lse_s, lse_t, k_p, k_q, lse_1
    g_ptr,  # (N,) float32 upstream gradients of the rows' losses
    dzs_ptr,  # (N, >= c1 - c0) out: the student's logit gradient
    dzt_ptr,  # (N, >= c1 - c0) out: the teacher's (NEED_T)
    N,
    V,
    Ds,
    Dt,
    c0,  # the chunk's classes c0:c1
    c1,
    stride_hs,
    stride_ws,
    stride_ht,
    stride_wt,
    stride_dz,  # (dzs's and dzt's)
    n_row_blocks,
    cap_s,  # softcaps, 0: off
    cap_t,
    inv_temp,  # 1 / temperature
    temperature,
    beta,  # the JSD's mixture weight
    log_beta,  # log beta and log(1 - beta)
    log_1mbeta,
    ce_weight,
    MODE: tl.constexpr,  # FWD_KL, REV_KL or JSD
    NEED_CE: tl.constexpr,
    NEED_T: tl.constexpr,  # the teacher's gradient too
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
    rb = pid % n_row_blocks
    cb = pid // n_row_blocks
    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    jj = cb * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = c0 + jj
    cmask = cols < c1
    # (by bulk loads, weight rows past c1 are real classes: masked by cmask like the others)
    zs, ts = head_tile(hs_ptr, ws_ptr, hs_desc, ws_desc, bs_ptr, rb * BLOCK_N, c0 + cb * BLOCK_V,
                       rows, cols, rmask, cmask, Ds, stride_hs, stride_ws, 1.0, cap_s, inv_temp,
                       HAS_BS, CAP_S, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION, EVEN_KS,
                       USE_TMA)
    zt, tt = head_tile(ht_ptr, wt_ptr, ht_desc, wt_desc, bt_ptr, rb * BLOCK_N, c0 + cb * BLOCK_V,
                       rows, cols, rmask, cmask, Dt, stride_ht, stride_wt, 1.0, cap_t, inv_temp,
                       HAS_BT, CAP_T, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION, EVEN_KT,
                       USE_TMA)
    # per-token statistics of the forward: lse_s, lse_t, and the divergence's own scalars
    lse_s = tl.load(st_ptr + rows, mask=rmask, other=0.0)[:, None]
    lse_t = tl.load(st_ptr + N + rows, mask=rmask, other=0.0)[:, None]
    k_p = tl.load(st_ptr + 2 * N + rows, mask=rmask, other=0.0)[:, None]
    k_q = tl.load(st_ptr + 3 * N + rows, mask=rmask, other=0.0)[:, None]
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)[:, None]
    log_q = zs - lse_s
    log_p = zt - lse_t
    q = tl.exp(log_q)
    p = tl.exp(log_p)
    if MODE == 0:  # k_p = KL(p||q)
        da = q - p
        db = p * (log_p - log_q - k_p)
    elif MODE == 1:  # k_q = KL(q||p)
        da = q * (log_q - log_p - k_q)
        db = p - q
    else:  # k_p = KL(p||m), k_q = KL(q||m)
        log_m = _log_mix(log_p, log_q, log_beta, log_1mbeta)
        da = (1.0 - beta) * q * (log_q - log_m - k_q)
        db = beta * p * (log_p - log_m - k_p)
    k = g * ((1.0 - ce_weight) * inv_temp)
    dzs = da * k
    if NEED_CE:
        lse_1 = tl.load(st_ptr + 4 * N + rows, mask=rmask, other=0.0)[:, None]
        tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        dzs += (g * ce_weight) * (tl.exp(zs * temperature - lse_1) - onehot)
    if CAP_S:
        dzs = dzs * (1.0 - ts * ts)
    out = (rows.to(tl.int64)[:, None] * stride_dz + jj[None, :])
    omask = rmask[:, None] & cmask[None, :]
    tl.store(dzs_ptr + out, dzs.to(dzs_ptr.dtype.element_ty), mask=omask)
    if NEED_T:
        dzt = db * k
        if CAP_T:
            dzt = dzt * (1.0 - tt * tt)
        tl.store(dzt_ptr + out, dzt.to(dzt_ptr.dtype.element_ty), mask=omask)


# ---- launchers ------------------------------------------------------------------------------

def backward(hs, ws, bs, ht, wt, bt, targets, stats, g_rows, mode, beta, temperature, cap_s,
             cap_t, ce_weight, need):
    """Gradients of sum_i g_i loss_i w.r.t. (hs, ws, bs, ht, wt, bt) where ``need`` says (an
    empty tensor for the others), given the forward's stats."""
    n, v = hs.shape[0], ws.shape[0]
    dt = hs.dtype
    t, kernel_args = common_args(hs, ws, bs, ht, wt, bt, targets, beta, temperature, cap_s, cap_t)
    need_t = any(need[3:])
    f32 = dict(device=hs.device, dtype=torch.float32)

    def out(x, on, acc):
        if not on:
            return hs.new_empty(0)
        kw = f32 if acc else dict(device=x.device, dtype=x.dtype)
        return torch.zeros(x.shape, **kw) if acc or n == 0 else torch.empty(x.shape, **kw)

    # dE sums over vocabulary chunks in float32 (half of it in dE's bytes); each row of dC (all
    # tokens in one product) and of dbias is written once, dC in its own dtype: no float32 V x D
    grads = [HiddenGrad(hs) if need[0] else out(hs, False, True), out(ws, need[1], False),
             out(ws[:, 0], need[2], True), HiddenGrad(ht) if need[3] else out(ht, False, True),
             out(wt, need[4], False), out(wt[:, 0], need[5], True)]
    if n > 0 and any(need):
        ws_dtype = torch.float32 if configs.interpreting() else dt
        # the workspace beside dE's float32 halves, the forward's statistics and the rows'
        # upstream gradients; in the interpreter one tile a chunk (several at test sizes)
        held = sum(g.extra_bytes for g in grads if isinstance(g, HiddenGrad)) + 8 * n * 4
        cv = t.block_v if configs.interpreting() else chunks.distill_chunk_v(
            n, v, chunks.workspace_floor(n, v, hs.shape[1], hs.dtype), held,
            torch.finfo(ws_dtype).bits // 8 * (2 if need_t else 1), t.block_v,
            configs.current(hs.device).distill_min_chunk_v)
        dzs = torch.empty((n, cv), device=hs.device, dtype=ws_dtype)
        dzt = torch.empty((n, cv), device=hs.device, dtype=ws_dtype) if need_t else dzs
        n_row_blocks = kernel_args["n_row_blocks"]
        for c0 in range(0, v, cv):
            c1 = min(c0 + cv, v)
            grid = (n_row_blocks * triton.cdiv(c1 - c0, t.block_v),)
            _dz_kernel[grid](
                **kernel_args,
                st_ptr=stats,
                g_ptr=g_rows,
                dzs_ptr=dzs,
                dzt_ptr=dzt,
                c0=c0,
                c1=c1,
                stride_dz=dzs.stride(0),
                beta=beta,
                ce_weight=ce_weight,
                MODE=mode,
                NEED_CE=ce_weight > 0,
                NEED_T=need_t,
            )
            for (dh, dw, db), h, w, dz, on in ((grads[:3], hs, ws, dzs, need[:3]),
                                               (grads[3:], ht, wt, dzt, need[3:])):
                if not any(on):
                    continue
                z = dz[:, :c1 - c0].to(h.dtype)
                if on[0]:
                    dh.add(z, w[c0:c1])
                if on[1]:  # rounded once from float32 sums
                    if z.is_cuda:
                        torch.mm(z.T, h, out=dw[c0:c1])
                    else:  # the interpreter's tests: CPU has no mixed-dtype mm
                        dw[c0:c1] = _mm_f32(z.T, h)
                if on[2]:
                    db[c0:c1] = dz[:, :c1 - c0].sum(0, dtype=torch.float32)
        del dzs, dzt, z  # not alive beside the conversion's temporaries below
    # 4096 rows at a time held 22 MB of temporaries at a Qwen 0.5B student (H200: 16% beyond the
    # gradients); 0.25% of the gradients' rows keeps them at ~0.5%
    step = max(256, (n + v) // 400)
    for i in (0, 3):
        if need[i]:
            grads[i] = grads[i].result(step)
    return grads
