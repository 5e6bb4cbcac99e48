"""The per-row prologue of a fused training call (see cutce.engine.planner) in one launch: each row's
coefficients in the reduced loss and the flag of the targets check.

In an eager call from an idle GPU, the GPU waits for the host until the first logit kernel is
queued. The same work as torch ops (the targets check and :func:`cutce.engine.loss.row_coefs`) was
~12 small kernels, 0.9 ms of host time on the H200's host; one Triton launch takes ~0.1 ms.
It covers the calls that the Triton fused strategy takes without class weights (no label
smoothing there either); the others keep the torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs


@triton.jit
def _row_coefs_kernel(
    t_ptr,  # (N,) int64 targets
    w_ptr,  # (N,) token weights (HAS_W)
    coef_ptr,  # (4, N) float32 out: coefficients of lse, -zt, -zsum/V, lse^2
    bad_ptr,  # (1,) int32 out: 1 if a target is outside [0, V) and not ignore_index
    N,
    V,
    stride_t,
    stride_w,
    stride_c,
    ignore_index,
    z_loss,
    HAS_W: tl.constexpr,
    MEAN: tl.constexpr,  # reduction "mean" (else "sum")
    Z_LOSS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program: "mean" needs the sum over all rows before any coefficient is written, and a
    # single program sums in a fixed order (bitwise reproducible; no atomics).
    offs0 = tl.arange(0, BLOCK)
    denom = 1.0
    if MEAN:
        tot = tl.zeros((BLOCK,), tl.float32)
        cnt = tl.zeros((BLOCK,), tl.int32)
        for i in range(0, N, BLOCK):
            offs = i + offs0
            m = offs < N
            t = tl.load(t_ptr + offs.to(tl.int64) * stride_t, mask=m, other=ignore_index)
            if HAS_W:
                w = tl.load(w_ptr + offs.to(tl.int64) * stride_w, mask=m, other=0.0).to(tl.float32)
            else:
                w = tl.full((BLOCK,), 1.0, tl.float32)
            tot += tl.where(m & (t != ignore_index), w, 0.0)
            cnt += (m & (t != ignore_index)).to(tl.int32)
        denom = tl.sum(tot, 0)
        # weights summing to 0: nothing valid gives coefficients 0 (loss 0); valid tokens of
        # weight 0 give NaN (0/0, as F.cross_entropy; cutce.engine.loss.mean_denominator)
        denom = tl.where(denom == 0, tl.where(tl.sum(cnt, 0) > 0, float("nan"), 1.0), denom)
    bad = tl.zeros((BLOCK,), tl.int32)
    for i in range(0, N, BLOCK):
        offs = i + offs0
        m = offs < N
        t = tl.load(t_ptr + offs.to(tl.int64) * stride_t, mask=m, other=ignore_index)
        keep = t != ignore_index
        bad = tl.maximum(bad, (((t < 0) | (t >= V)) & keep).to(tl.int32))
        if HAS_W:
            w = tl.load(w_ptr + offs.to(tl.int64) * stride_w, mask=m, other=0.0).to(tl.float32)
        else:
            w = tl.full((BLOCK,), 1.0, tl.float32)
        if MEAN:
            w = w / denom
        w = tl.where(keep, w, 0.0)
        tl.store(coef_ptr + offs, w, mask=m)
        tl.store(coef_ptr + stride_c + offs, w, mask=m)
        tl.store(coef_ptr + 2 * stride_c + offs, tl.zeros((BLOCK,), tl.float32), mask=m)
        if Z_LOSS:
            tl.store(coef_ptr + 3 * stride_c + offs, z_loss * w, mask=m)
        else:
            tl.store(coef_ptr + 3 * stride_c + offs, tl.zeros((BLOCK,), tl.float32), mask=m)
    tl.store(bad_ptr, tl.max(bad, 0))


def row_coefs(targets, token_weights, vocab, ignore_index, z_loss, mean):
    """(coef, bad): what ``cutce.engine.loss.row_coefs(targets != ignore_index, token_weights,
    opts, float32, None, vocab)`` returns for label smoothing 0, and ``bad``, a (1,) int32 tensor that is 1 when a
    target is outside [0, vocab) and not ignore_index, else 0.

    Args: targets (N,) int64; token_weights (N,) float or None; vocab: the global V; z_loss >= 0;
    mean: reduction "mean" (else "sum"). coef is (4, N) float32: the rows' coefficients of lse,
    -zt, -zsum/V (0) and lse^2, token weight w_i (1 without) where targets != ignore_index, else
    0, divided by their sum under "mean" (by 1 when no target is valid; NaN on the valid rows
    when valid targets' weights sum to 0).
    """
    n = targets.numel()
    coef = torch.empty((4, n), device=targets.device, dtype=torch.float32)
    bad = (torch.empty if n else torch.zeros)(1, device=targets.device, dtype=torch.int32)
    if n:
        w = token_weights if token_weights is not None else targets
        _row_coefs_kernel[(1,)](
            t_ptr=targets,
            w_ptr=w,
            coef_ptr=coef,
            bad_ptr=bad,
            N=n,
            V=vocab,
            stride_t=targets.stride(0),
            stride_w=w.stride(0),
            stride_c=coef.stride(0),
            ignore_index=ignore_index,
            z_loss=float(z_loss),
            HAS_W=token_weights is not None,
            MEAN=bool(mean),
            Z_LOSS=z_loss != 0,
            BLOCK=configs.current(targets.device).rows_block,
            num_warps=4,
        )
    return coef, bad
