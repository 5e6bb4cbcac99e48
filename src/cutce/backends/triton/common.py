"""The logit tile every kernel recomputes, so that forward and backward see bitwise-equal logits."""

import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _tanh(x):
    # libdevice is unavailable in Triton's interpreter; this form saturates correctly at +-inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def log_fast(x, FAST: tl.constexpr):
    """log(x) for float32 0 < x < 2**104, subnormals included. FAST (the GPU): the
    special-function unit's approximate log2 times ln 2 (~2**-22 relative error), ~12
    instructions where tl.log's accurate form takes ~35 (the JSD's dz passes took two per entry
    and were bound by them, not by memory); x is scaled by 2**24 first because that unit
    flushes subnormals to -inf. Else tl.log (the interpreter has no libdevice)."""
    if FAST:
        return libdevice.fast_logf(x * 16777216.0) - 16.635532333438686
    else:
        return tl.log(x)


@triton.jit
def _transform(acc, b_ptr, cols, cmask, scale, softcap, inv_temp, HAS_BIAS: tl.constexpr,
               SOFTCAP: tl.constexpr):
    """(z, t) from the raw dot products of a tile: + bias, * scale, softcap, / temperature."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc = acc * scale
    t = acc
    if SOFTCAP:
        t = _tanh(acc / softcap)
        acc = t * softcap
    return acc * inv_temp, t


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, rows, w_rows, rmask, cmask, D, stride_h, stride_w,
               scale, softcap, inv_temp,
               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr, EVEN_K: tl.constexpr):
    """z[i, j] for hidden rows ``rows`` and weight rows ``w_rows``, float32 (BLOCK_N, BLOCK_V).

    Returns (z, t) where t = tanh(y / softcap) (the softcap derivative needs it; z itself when
    SOFTCAP is off). Offsets are 64-bit: N*D and V*D may exceed 2**31.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_base = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_base = w_ptr + w_rows.to(tl.int64)[:, None] * stride_w
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(h_base + ks[None, :], mask=rmask[:, None], other=0.0)
            b = tl.load(w_base + ks[None, :], mask=cmask[:, None], other=0.0)
        else:
            kmask = ks < D
            a = tl.load(h_base + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_base + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:  # the interpreter computes bf16 arithmetic wrongly: do it in float32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return _transform(acc, b_ptr, w_rows, cmask, scale, softcap, inv_temp, HAS_BIAS, SOFTCAP)


@triton.jit
def logit_tile_desc(h_desc, w_desc, b_ptr, row0, col0, cols, cmask, D, scale, softcap, inv_temp,
                    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr):
    """:func:`logit_tile` for contiguous rows row0.. and classes col0.., loaded by the tensor
    memory accelerator (Hopper's bulk copies: no address arithmetic or masks in the loop, and
    out-of-range rows and the ragged end of D arrive as zeros). Same arithmetic, same result."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        a = h_desc.load([row0, k])
        b = w_desc.load([col0, k])
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return _transform(acc, b_ptr, cols, cmask, scale, softcap, inv_temp, HAS_BIAS, SOFTCAP)


@triton.jit
def head_tile(h_ptr, w_ptr, h_desc, w_desc, b_ptr, row0, col0, rows, cols, rmask, cmask, D,
              stride_h, stride_w, scale, softcap, inv_temp, HAS_BIAS: tl.constexpr,
              SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
              BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              EVEN_K: tl.constexpr, USE_TMA: tl.constexpr):
    """(z, t) of one tile by :func:`logit_tile_desc` (rows row0.., classes col0..) when USE_TMA,
    else by :func:`logit_tile` (rows ``rows``, weight rows ``cols``): the branch every kernel
    takes, in one place."""
    if USE_TMA:
        z, t = logit_tile_desc(h_desc, w_desc, b_ptr, row0, col0, cols, cmask, D, scale, softcap,
                               inv_temp, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST,
                               PRECISION)
    else:
        z, t = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w,
                          scale, softcap, inv_temp, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K,
                          UPCAST, PRECISION, EVEN_K)
    return z, t


def tma_descriptor(t, block_rows, block_cols):
    """Host-side tensor descriptor of a 2-D tensor for (block_rows, block_cols) tiles."""
    return TensorDescriptor.from_tensor(t, [block_rows, block_cols])
