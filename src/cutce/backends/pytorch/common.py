"""What the torch backend's loss and distillation (and the vocabulary-parallel distillation, which
runs on this backend) share: the compute dtype, the chunk of tokens that fits a byte budget, the
softcap with its derivative, and one head's chunked products."""

from __future__ import annotations

import torch


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when every input is float64; float32 otherwise."""
    return torch.float64 if all(d == torch.float64 for d in dtypes) else torch.float32


def chunk_rows(n: int, vocab: int, cdt: torch.dtype, budget_bytes: int, temps: int) -> int:
    """Tokens per chunk so that ``temps`` chunk x vocab temporaries of ``cdt`` fit in
    ``budget_bytes`` (at least 1, at most n)."""
    per_row = max(vocab, 1) * torch.finfo(cdt).bits // 8 * temps
    return max(1, min(max(n, 1), budget_bytes // per_row))


def backward_buffers(hidden, weight, bias, lse, g_lse, g_zt, need_h, need_w, need_b):
    """(w, b, dh, dw, db, g_lse, g_zt) of a chunked backward: the weight and bias in the
    compute dtype (lse's), dE in hidden's dtype, dC and db accumulators in the compute dtype
    (None where not needed), and the upstream gradients of lse and zt with zeros for the ones
    autograd did not pass."""
    cdt = lse.dtype
    w = weight.to(cdt)
    zeros = torch.zeros_like(lse) if g_lse is None or g_zt is None else None
    return (w, None if bias is None else bias.to(cdt),
            torch.empty_like(hidden) if need_h else None,
            torch.zeros_like(w) if need_w else None,
            lse.new_zeros(weight.shape[0]) if need_b else None,
            zeros if g_lse is None else g_lse, zeros if g_zt is None else g_zt)


def add_chunk_grads(dz, h, w, s, e, dh, dw, db) -> None:
    """The end of a chunk's backward, from its logit gradient dz (chunk x V, compute dtype):
    dE rows s:e = dz @ W (rounded to dh's dtype), dC += dz^T h, db += dz's column sums, for
    each of dh, dw, db that is not None."""
    if dh is not None:
        dh[s:e] = (dz @ w).to(dh.dtype)
    if dw is not None:
        dw.addmm_(dz.T, h)
    if db is not None:
        db += dz.sum(dim=0)


def op_grads(hidden, weight, bias, dh, dw, db):
    """(dh, dw, db) as a custom op returns them: in the inputs' dtypes, an empty tensor of its
    own for a gradient not asked for (an op's outputs are never None and never alias)."""
    return (hidden.new_empty(0) if dh is None else dh,
            hidden.new_empty(0) if dw is None else dw.to(weight.dtype),
            hidden.new_empty(0) if db is None else db.to(bias.dtype))


def softcap_(y: torch.Tensor, softcap: float | None) -> torch.Tensor | None:
    """y <- softcap * tanh(y / softcap) in place; returns d(new y)/d(old y) = 1 - tanh^2
    (None without a softcap)."""
    if not softcap:
        return None
    t = torch.tanh(y.div_(softcap))
    y.copy_(t).mul_(softcap)
    return t.square_().neg_().add_(1.0)


def mixed_ok(t: torch.Tensor) -> bool:
    """Whether CUDA multiplies ``t``'s dtype into float32 results directly (16-bit operands)."""
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def mm_f32(a, b):
    """a @ b of two 16-bit operands with float32 accumulation and result. CPU has no such
    kernel: there (the tests of the CUDA path's rounding) the operands are upcast, which gives
    the same values up to summation order, as products of 16-bit numbers are exact in float32."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class Head:
    """One head's matmuls in float32 (float64) results without a float32 copy on CUDA.

    ``mixed`` (default: :func:`mixed_ok`) multiplies the 16-bit operands as they are, rounding a
    float32 logit gradient to their dtype first (as the Triton backward does); True on the CPU
    emulates it (see :func:`mm_f32`)."""

    def __init__(self, hidden, weight, bias, cdt, mixed=None):
        self.hidden, self.cdt = hidden, cdt
        self.mixed = mixed_ok(hidden) if mixed is None else mixed
        self.weight = weight if self.mixed else weight.to(cdt)
        self.bias = None if bias is None else bias.to(cdt)

    def logits(self, s, e):
        h = self.hidden[s:e]
        if self.mixed:
            y = mm_f32(h, self.weight.T)
        else:
            y = h.to(self.cdt) @ self.weight.T
        return y if self.bias is None else y.add_(self.bias)

    def grad_hidden(self, dy):
        if self.mixed:
            return mm_f32(dy.to(self.weight.dtype), self.weight)
        return dy @ self.weight

    def add_grad_weight(self, acc, dy, s, e):
        h = self.hidden[s:e]
        if not self.mixed:
            acc.addmm_(dy.T, h.to(self.cdt))
        elif acc.is_cuda:
            torch.addmm(acc, dy.T.to(h.dtype), h, out_dtype=torch.float32, out=acc)
        else:
            acc.addmm_(dy.T.to(h.dtype).float(), h.float())
