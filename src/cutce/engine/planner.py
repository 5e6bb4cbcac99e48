"""The one place that decides, per call, how a loss is computed: which strategy, which chunks.

Two exact strategies share the backend contract (see :mod:`cutce.backends.torch.ce`):

- **recompute**: the forward keeps O(N) values, the backward recomputes the logit tiles. Four
  N x D x V products (forward, recompute, dE, dC); extra memory <= ~10% of the gradients at
  ``memory_budget=0``; within a budget that covers it, its backward also sums dC in a float32
  V x D buffer when it splits the tokens (:func:`recompute_dc_f32`). It serves any upstream
  gradient (reduction "none", a returned lse, log-probs, entropy).
- **fused**: for a training call whose upstream gradient is known up to one scalar (reduction
  "mean"/"sum", no returned lse), the logits of a chunk of tokens are computed once, their
  softmax gradient formed right away, and dE and dC produced from it in the forward: three
  products. The backward only scales them by the upstream scalar.

Memory of the fused strategy, beyond the gradients (16-bit inputs on the GPU):
- the chunk's logit gradient, chunk_n x V values. It lives in the bytes of dC itself while
  chunk_n <= D (dC is V x D and is only written at the end), else in its own buffer;
- with more than one token chunk, a float32 accumulator of dC (V x D x 4 bytes), so that dC's
  running sum is never rounded to the weight's dtype between chunks (exact at any N);
- small per-chunk temporaries (chunk_n x D float32).
On the torch path (float32 compute) the float32 dC is the gradient's own accumulator; the chunk
holds a few float32 chunk_n x V temporaries.

``memory_budget`` (a user option) is the extra memory allowed beyond the gradients, as a fraction
of the gradients' size. The plan takes the fused strategy with the fewest, largest chunks that
fit, else the recompute strategy. ``memory_budget=0`` always gives the recompute strategy.
Defaults: 2.0 on the Triton path (the float32 dC accumulator alone is ~2x dC's 16-bit bytes, so
less would leave only the recompute strategy at large vocabularies); 1.0 on the torch path,
which has no accumulator and whose CPU GEMMs are as fast with 256 rows as with 512 (measured:
N=4096, D=512, V=65536, float32: 6.3 s at +287 MB vs 6.7-7.3 s at +406 MB).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .options import DEFAULT_MEMORY_BUDGET

# Fewer tokens per chunk than this and the fused strategy loses to recompute on the GPU: the dE
# product of a chunk (chunk x D outputs, K = V) gets too few output tiles and dC's float32
# accumulator is passed over too often (H200, D=1024, V=128256, chunks of 1024: 24.3 ms vs
# 22.1 ms per model step; chunks of 2304 and 4096 at the Gemma and Llama heads win 14-21%).
MIN_FUSED_CHUNK = {"triton": 2048, "torch": 64}
# Most tokens per chunk (the GEMMs gain nothing beyond; each chunk's dC pass costs V x D x 8 bytes).
MAX_FUSED_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class Plan:
    """strategy: "recompute" | "fused"; chunk_n: tokens per chunk of the fused strategy (0 for
    recompute); dc_in_place: the chunk's logit gradient lives in dC's bytes; dc_f32: dC summed in
    a float32 accumulator over token chunks (more than one chunk, 16-bit weight)."""

    strategy: str
    chunk_n: int = 0
    dc_in_place: bool = False
    dc_f32: bool = False

    @property
    def fused(self) -> bool:
        return self.strategy == "fused"


RECOMPUTE = Plan("recompute")


def _elt(dtype):
    return torch.finfo(dtype).bits // 8


def gradient_bytes(n, v, d, dtype, need_h=True, need_w=True):
    return (need_h * n + need_w * v) * d * _elt(dtype)


def fused_extra_bytes(n, v, d, dtype, chunk_n, need_w, backend):
    """Extra bytes of the fused strategy with this chunk (see the module docstring)."""
    elt = _elt(dtype)
    if backend == "torch":  # compute-dtype temporaries; dC summed in the compute dtype
        cdt = 8 if dtype == torch.float64 else 4
        w_copy = 0 if elt == cdt else 2 * v * d * cdt  # float32 weight + its float32 gradient
        return 2 * chunk_n * v * cdt + chunk_n * d * cdt + w_copy
    chunks = math.ceil(n / chunk_n)
    in_place = need_w and chunks > 1 and dtype != torch.float32 and chunk_n <= d
    x = 0 if in_place else chunk_n * v * elt
    acc = v * d * 4 if need_w and chunks > 1 and dtype != torch.float32 else 0
    return x + acc + chunk_n * d * (4 + elt)


def plan(n, v, d, dtype, backend, fusable, memory_budget, need_h=True, need_w=True,
         chunk_bytes=None) -> Plan:
    """The strategy and chunk for a call of n tokens, v classes, d features.

    ``backend``: "triton" or "torch". ``fusable``: the call's upstream gradient is known up to a
    scalar (the api decides). ``memory_budget``: extra bytes allowed beyond the gradients, as a
    fraction of their size. ``chunk_bytes`` (torch path) also caps its chunk's temporaries.
    """
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET[backend]
    if not fusable or memory_budget <= 0 or n == 0 or not (need_h or need_w):
        return RECOMPUTE
    budget = memory_budget * gradient_bytes(n, v, d, dtype, need_h, need_w)
    lo = min(n, MIN_FUSED_CHUNK[backend])
    hi = min(n, MAX_FUSED_CHUNK)
    if backend == "torch" and chunk_bytes is not None:
        hi = max(lo, min(hi, chunk_bytes // (2 * v * 4)))
    best = None
    # Candidates: all tokens at once, the largest chunk that fits in dC's bytes (d), powers of
    # two. Fewest chunks wins (each chunk costs a pass over dC's accumulator), then the largest.
    cands = {hi, min(hi, d)} | {1 << k for k in range(14) if lo <= 1 << k <= hi}
    for c in sorted(cands, reverse=True):
        c = max(c, lo)
        if fused_extra_bytes(n, v, d, dtype, c, need_w, backend) > budget:
            continue
        key = (math.ceil(n / c), -c)
        if best is None or key < best[0]:
            best = (key, c)
    if best is None:
        return RECOMPUTE
    c = best[1]
    chunks = math.ceil(n / c)
    # Same number of chunks, equal sizes (a multiple of 128, the GEMMs' tile): 8192 tokens in
    # chunks of 2304 left a last chunk of 1280 whose three products ran at a lower rate.
    if backend == "triton":
        c = min(c, max(lo, -(-math.ceil(n / chunks) // 128) * 128))
    acc16 = need_w and chunks > 1 and dtype != torch.float32
    return Plan("fused", chunk_n=c, dc_in_place=backend == "triton" and acc16 and c <= d,
                dc_f32=acc16)


def recompute_dc_f32(n, v, d, dtype, memory_budget, need_h=True, need_w=True) -> bool:
    """Whether the recompute strategy's backward (Triton path) sums dC over token chunks in a
    float32 V x D accumulator: when the budget covers it (the default does at every shape, as
    V x D x 4 bytes <= 2 x the gradients). Below that (``memory_budget`` < ~2, 0 included), dC
    is rounded to the weight's dtype once per token chunk: its error grows with the number of
    chunks (docs/benchmarks.md measures it)."""
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET["triton"]
    if not need_w or dtype == torch.float32 or memory_budget <= 0:
        return False
    return v * d * 4 <= memory_budget * gradient_bytes(n, v, d, dtype, need_h, need_w)


# ---- the fused strategy's autograd, shared by both backends' fused ops -----------------------
# Each op returns (total, lse, dh, dw, db): the gradients of total formed in its forward.

def fused_setup_context(ctx, inputs, output):
    # Not differentiable: no grad_fn, so ctx holding them makes no reference cycle.
    ctx.mark_non_differentiable(*output[1:])
    # Autograd would otherwise pass zero tensors as the upstream grads of the non-differentiable
    # outputs, one of them dC-sized: a V x D memset in every backward (and its bytes at the peak).
    ctx.set_materialize_grads(False)
    ctx.grads = output[2:]
    ctx.n_inputs = len(inputs)


def fused_backward(ctx, g_total, *_):
    """d(total)/d(hidden, weight, bias) = g_total * (the forward's gradients), scaled in place:
    no second copy of dC. They are handed out once: a second backward through the same call
    raises (use memory_budget=0 to backward twice)."""
    grads = ctx.grads
    if grads is None:
        raise RuntimeError("cutce: this fused loss was already backpropagated (its gradients are "
                           "formed in the forward and handed out once); use memory_budget=0 to "
                           "backward through it twice")
    ctx.grads = None
    if g_total is None:  # no upstream gradient reached the loss (grads are not materialized)
        return (None,) * ctx.n_inputs
    mul_ = getattr(ctx, "scale_", None) or torch.Tensor.mul_  # a backend's faster in-place product
    out = [mul_(g, g_total) if need else None for g, need in zip(grads, ctx.needs_input_grad)]
    return (*out, *[None] * (ctx.n_inputs - 3))
