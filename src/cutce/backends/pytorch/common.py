"""What the torch backend's loss and distillation share: the compute dtype, the chunk of tokens
that fits a byte budget, and the softcap with its derivative."""

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


def softcap_(y: torch.Tensor, softcap: float | None) -> torch.Tensor | None:
    """y <- softcap * tanh(y / softcap) in place; returns d(new y)/d(old y) = 1 - tanh^2
    (None without a softcap)."""
    if not softcap:
        return None
    t = torch.tanh(y.div_(softcap))
    y.copy_(t).mul_(softcap)
    return t.square_().neg_().add_(1.0)
