"""One-pass elementwise kernels on the fused strategies' buffers, where torch's generic mixed-dtype
kernels were slow (times from the H200): a row scaling of dE's chunk, a cast of dC's float32
accumulator, and the backward's in-place scaling of stored gradients by the upstream scalar.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs


@triton.jit
def _cast_scale_kernel(
    src_ptr,  # (n,)
    dst_ptr,  # (n,) out, may be src
    g_ptr,  # () the factor (HAS_G)
    n,
    HAS_G: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # dst = (src * g) in dst's dtype, float32 arithmetic (in place when src is dst)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if HAS_G:
        g = tl.load(g_ptr).to(tl.float32)
        # in place by 1 (loss.backward() of a plain loss): no pass over dC at all
        m = m & (g != 1.0)
        x = tl.load(src_ptr + offs, mask=m).to(tl.float32) * g
    else:
        x = tl.load(src_ptr + offs, mask=m).to(tl.float32)
    tl.store(dst_ptr + offs, x.to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _row_scale_kernel(
    src_ptr,  # (R, C) float32
    s_ptr,  # (R,) float32
    dst_ptr,  # (R, C) out
    R,
    C,
    stride_src,
    stride_dst,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # dst[r, c] = src[r, c] * s[r] in float32, rounded once to dst's dtype
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (rows < R)[:, None] & (cols < C)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(src_ptr + r64 * stride_src + cols[None, :], mask=m, other=0.0)
    s = tl.load(s_ptr + rows, mask=rows < R, other=0.0)
    tl.store(dst_ptr + r64 * stride_dst + cols[None, :],
             (x * s[:, None]).to(dst_ptr.dtype.element_ty), mask=m)


def row_scale(dst, src, s):
    """dst = src * s[:, None] (float32 arithmetic, rounded once to dst's dtype), in one pass:
    dE's chunk rows from their float32 product (torch's mixed-dtype broadcast product ran at
    ~1.2 TB/s on the H200, 80 us per 4096 x 4096 chunk). src (R, C) float32, s (R,) float32,
    dst (R, C); unit inner strides."""
    r, c = src.shape
    if r and c:
        br, bc, warps = configs.current(src.device).row_scale_tile
        _row_scale_kernel[(triton.cdiv(r, br), triton.cdiv(c, bc))](
            src_ptr=src,
            s_ptr=s,
            dst_ptr=dst,
            R=r,
            C=c,
            stride_src=src.stride(0),
            stride_dst=dst.stride(0),
            BLOCK_R=br,
            BLOCK_C=bc,
            num_warps=warps,
        )
    return dst


_CAST_BLOCK = 4096


def copy_cast_(dst, src):
    """dst.copy_(src) for contiguous CUDA tensors of one size (torch's generic cast kernel ran
    the float32 -> bfloat16 copy of dC's accumulator at ~2.9 TB/s on the H200)."""
    if not (dst.is_cuda and dst.is_contiguous() and src.is_contiguous()) or dst.numel() != src.numel():
        return dst.copy_(src)
    n = dst.numel()
    _cast_scale_kernel[(triton.cdiv(n, _CAST_BLOCK),)](
        src_ptr=src,
        dst_ptr=dst,
        g_ptr=src,  # (unread: HAS_G is off)
        n=n,
        HAS_G=False,
        BLOCK=_CAST_BLOCK,
        num_warps=8,
    )
    return dst


def scale_(t, g):
    """t.mul_(g) for a 0-dim float32 g, float32 arithmetic, one pass (torch's mixed-dtype
    in-place product took 1.24 ms for Gemma's 590M-entry dC on the H200). Under torch.compile
    (fake tensors) or off CUDA it is torch's own mul_."""
    # type(...) is torch.Tensor: not a fake/functional tensor of a tracer (aot_autograd traces
    # the backward without dynamo, so is_compiling() alone does not see it)
    if (torch.compiler.is_compiling() or type(t) is not torch.Tensor or type(g) is not torch.Tensor
            or not (t.is_cuda and t.is_contiguous() and g.is_cuda)):
        return t.mul_(g)
    n = t.numel()
    if n:
        _cast_scale_kernel[(triton.cdiv(n, _CAST_BLOCK),)](
            src_ptr=t,
            dst_ptr=t,
            g_ptr=g,
            n=n,
            HAS_G=True,
            BLOCK=_CAST_BLOCK,
            num_warps=8,
        )
    return t
