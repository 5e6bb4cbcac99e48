"""Exact chunked PyTorch implementation: the CPU path and the oracle of the kernels.

Every backend computes the same four per-token quantities (the *backend contract*); the api turns
them into a loss (or log-probabilities) with ordinary differentiable O(N) torch code, so that every
option's gradient term falls out of autograd and the backends only see four upstream vectors.

    lse_i  = logsumexp_j z_ij
    zt_i   = z_{i, t_i}            (0 where t_i is not in [0, V), e.g. ignore_index)
    zsum_i = sum_j z_ij            (0 unless opts.need_zsum)
    pz_i   = sum_j p_ij z_ij       (0 unless opts.need_entropy), p = softmax(z)

with z the transformed logits of :class:`cutce.options.Options`. Here they are computed in float32
(float64 for float64 inputs) over chunks of tokens: the forward keeps only these O(N) values, the
backward recomputes each chunk's logits. No tensor of N x V elements exists at any time; the peak
extra memory is a chunk of logits (sized from ``opts.chunk_bytes``) plus, when the weight is not
already in the compute dtype, one float32 copy of it and of its gradient accumulator.
"""

from __future__ import annotations

import torch

from .options import Options

DEFAULT_CHUNK_BYTES = 256 * 2**20
# A chunk holds about this many N x V-sized float temporaries at once (z, p/dz, and one more
# inside logsumexp or the softcap derivative).
_TEMPS_PER_CHUNK = 3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(n_tokens: int, vocab: int, dtype: torch.dtype, chunk_bytes: int | None) -> int:
    """Tokens per chunk so that a chunk's logit temporaries fit in ``chunk_bytes``."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    per_row = max(vocab, 1) * torch.finfo(dtype).bits // 8 * _TEMPS_PER_CHUNK
    return max(1, min(max(n_tokens, 1), budget // per_row))


def _logits(h, w, b, opts: Options):
    """(z, capped) for one chunk: z as in Options; capped = tanh(y / softcap) (None without softcap)."""
    y = h @ w.T
    if b is not None:
        y += b
    if opts.logit_scale != 1.0:
        y *= opts.logit_scale
    capped = None
    if opts.softcap is not None:
        capped = torch.tanh(y / opts.softcap)
        y = capped * opts.softcap
    if opts.temperature != 1.0:
        y = y / opts.temperature
    return y, capped


def _valid_targets(t, vocab):
    valid = (t >= 0) & (t < vocab)
    return t.clamp(0, vocab - 1).unsqueeze(1), valid


class _LinearLSEParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: Options):
        cdt = compute_dtype(hidden.dtype)
        n, vocab = hidden.shape[0], weight.shape[0]
        w = weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        lse = hidden.new_empty(n, dtype=cdt)
        zt = torch.zeros_like(lse)
        zsum = torch.zeros_like(lse)
        pz = torch.zeros_like(lse)
        rows = chunk_rows(n, vocab, cdt, opts.chunk_bytes)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            z, _ = _logits(hidden[s:e].to(cdt), w, b, opts)
            lse[s:e] = torch.logsumexp(z, dim=1)
            idx, valid = _valid_targets(targets[s:e], vocab)
            zt[s:e] = torch.where(valid, z.gather(1, idx).squeeze(1), 0.0)
            if opts.need_zsum:
                zsum[s:e] = z.sum(dim=1)
            if opts.need_entropy:
                z.sub_(lse[s:e, None]).exp_()  # z now holds p; (p * z).sum = (p * (log p + lse)).sum
                pz[s:e] = torch.xlogy(z, z).sum(dim=1) + lse[s:e]
        ctx.save_for_backward(hidden, weight, bias, targets, lse, pz)
        ctx.opts = opts
        ctx.mark_non_differentiable(targets)
        return lse, zt, zsum, pz

    @staticmethod
    def backward(ctx, g_lse, g_zt, g_zsum, g_pz):
        hidden, weight, bias, targets, lse, pz = ctx.saved_tensors
        opts: Options = ctx.opts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = lse.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        w = weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        zeros = torch.zeros_like(lse)
        g_lse = zeros if g_lse is None else g_lse
        g_zt = zeros if g_zt is None else g_zt
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros_like(w) if need_w else None
        db = lse.new_zeros(vocab) if need_b else None
        rows = chunk_rows(n, vocab, cdt, opts.chunk_bytes)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            h = hidden[s:e].to(cdt)
            z, capped = _logits(h, w, b, opts)
            p = torch.exp(z - lse[s:e, None])
            if g_pz is not None and opts.need_entropy:
                # d(sum_j p_j z_j)/dz_k = p_k * (1 + z_k - sum_j p_j z_j)
                z.sub_(pz[s:e, None]).add_(1.0).mul_(g_pz[s:e, None]).add_(g_lse[s:e, None])
                dz = p.mul_(z)
            else:
                dz = p.mul_(g_lse[s:e, None])
            del z
            idx, valid = _valid_targets(targets[s:e], vocab)
            dz.scatter_add_(1, idx, torch.where(valid, g_zt[s:e], 0.0).unsqueeze(1))
            if g_zsum is not None and opts.need_zsum:
                dz += g_zsum[s:e, None]
            scale = opts.logit_scale / opts.temperature
            if capped is not None:
                dz *= 1.0 - capped.square_()
            if scale != 1.0:
                dz *= scale
            if need_h:
                dh[s:e] = (dz @ w).to(hidden.dtype)
            if need_w:
                dw.addmm_(dz.T, h)
            if need_b:
                db += dz.sum(dim=0)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None


def linear_lse_parts(hidden, weight, bias, targets, opts: Options):
    """The backend contract on the torch path.

    Args:
        hidden: (N, D) float tensor.
        weight: (V, D), same dtype and device as hidden.
        bias: (V,) or None.
        targets: (N,) int64; entries outside [0, V) give zt = 0.
        opts: validated :class:`Options`.

    Returns:
        (lse, zt, zsum, pz), each (N,) float32 (float64 for float64 inputs), differentiable with
        respect to hidden, weight and bias. Equal to, with z the transformed logits in float32::

            lse = torch.logsumexp(z, -1); zt = z.gather(1, targets[:, None])[:, 0]
            zsum = z.sum(-1); pz = (z.softmax(-1) * z).sum(-1)
    """
    return _LinearLSEParts.apply(hidden, weight, bias, targets, opts)
