"""The truncated log-probs' kept sets as lists of ids, for a backward without recomputed logits.

A sampler's kept set is usually small: top-k keeps k ids (and the ties at the k-th logit),
top-p a nucleus of a few tokens on most rows, min-p the tokens within a factor of the most
likely. The forward lists each row's kept ids with their logits (``z >= thr``: ties included),
row after row, while the lists fit :data:`IDS_PER_TOKEN` ids per token on average, and takes
the kept set's sums (lse, the entropy's) from them rather than from the chunk. The backward's dz is then nonzero at those ids and the target only, so dE and dC are a weighted
gather and scatter of weight rows (:func:`.gather.gathered_grads`) for all tokens at once: no
GEMM over the vocabulary and no recomputed logits. A call whose lists outgrow the budget
(flat distributions under top-p or min-p, top-k beyond it) drops them, and its backward
recomputes each chunk's logits (:mod:`cutce.backends.pytorch.truncated`).
"""

from __future__ import annotations

import torch

from .ce import _valid_targets
from .gather import gathered_grads

# Kept ids the forward lists per token, on average over the call. Past it the recompute is the
# cheaper backward. An estimate, not yet a measurement: at the Qwen2.5-7B head (D = 3584,
# V = 152064) a listed id costs a gather and a scatter of one 7 KiB weight row (~5 ns each on an
# H100 at 3 TB/s), a token's recompute and two GEMMs ~3 x 2 V D flops (~5 us at 700 TFLOP/s):
# even at 256 ids a token the lists cost about a third of the recompute.
IDS_PER_TOKEN = 256


class Lists:
    """The kept ids of a call's rows, listed chunk by chunk in the forward: ``counts`` (N,) ids
    a row, ``cols`` and ``vals`` (the first ``total`` of N x min(IDS_PER_TOKEN, V) entries)
    each listed id and its logit, row after row."""

    def __init__(self, n, vocab, cdt, device):
        size = n * min(IDS_PER_TOKEN, vocab)
        self.counts = torch.zeros(n, dtype=torch.int64, device=device)
        self.cols = torch.empty(size, dtype=torch.int64, device=device)
        self.vals = torch.empty(size, dtype=cdt, device=device)
        self.total, self.full = 0, False

    def add(self, s, keep, z):
        """List rows s: of a chunk: ``keep`` (r, V) bool, ``z`` (r, V) their logits. Returns the
        chunk's (counts, rows, vals) (each listed logit's row in the chunk), or None once the lists would outgrow their buffers (then they
        stay ``full``). One device-to-host copy."""
        if self.full:
            return None
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: each row's ids together
        m = rows.numel()
        if self.total + m > self.cols.numel():
            self.full = True
            return None
        r, a = keep.shape[0], self.total
        self.cols[a:a + m] = cols
        self.vals[a:a + m] = z[rows, cols]
        self.counts[s:s + r] = torch.bincount(rows, minlength=r)
        self.total += m
        return self.counts[s:s + r], rows, self.vals[a:a + m]

    def outputs(self):
        """(counts, cols, vals) for the op's outputs; cols and vals empty where the lists gave
        up."""
        if self.full:  # new tensors: views would hold on to the buffers
            return self.counts, self.cols.new_empty(0), self.vals.new_empty(0)
        return self.counts, self.cols, self.vals


def list_stats(counts, row, vals, need_entropy):
    """(lse, pz) (r,) of a chunk's rows from their listed logits (``counts`` (r,) a row, ``vals``
    row after row, ``row`` each one's row): the sums over the kept set without a pass over the
    chunk. A row with none listed (a vocabulary slice that keeps nothing of it) gets lse = -inf,
    pz = 0."""
    r = counts.numel()
    width = int(counts.max()) if r else 0
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(vals.numel(), device=counts.device) - starts[row]
    z = vals.new_full((r, max(width, 1)), float("-inf"))
    z[row, pos] = vals
    m = torch.where(counts > 0, z.amax(dim=1), 0.0)
    e = torch.exp(z - m[:, None])
    tot = e.sum(dim=1)
    lse = m + tot.log()
    if not need_entropy:
        return lse, torch.zeros_like(lse)
    q = e.div_(tot[:, None])
    return lse, torch.where(counts > 0, torch.xlogy(q, q).sum(dim=1) + lse, 0.0)


def top_k_stats(v, t, extra, need_entropy):
    """(lse, pz) (r,) over the kept set from top-k's candidates v (r, k) at or above thr t and
    ``extra`` logits equal to t that top-k left out (its ties at the k-th logit)."""
    m = v.amax(dim=1)  # the row's largest logit: min-p never drops it
    e = torch.where(v >= t[:, None], torch.exp(v - m[:, None]), 0.0)
    ex = torch.exp(t - m)
    tot = e.sum(dim=1) + extra * ex
    lse = m + tot.log()
    if not need_entropy:
        return lse, torch.zeros_like(lse)
    q, qx = e.div_(tot[:, None]), ex / tot
    return lse, torch.xlogy(q, q).sum(dim=1) + extra * torch.xlogy(qx, qx) + lse


def grads(hidden, weight, targets, saved, grads, need_h, need_w, need_b, cfg):
    """(dh, dw, db) from the listed kept sets: ``saved`` (lse, zt, pz, thr, counts, cols,
    vals), ``grads`` (g_lse, g_zt, g_pz; the first two not None). Each token's bag is its listed
    ids and then its target, whose coefficient is its zt's gradient. dh and dw in the weight's
    dtype on CUDA with 16-bit weights, else in the compute dtype; None where not needed."""
    lse, zt, pz, _, counts, cols, vals = saved
    g_lse, g_zt, g_pz = grads
    n, vocab = hidden.shape[0], weight.shape[0]
    total = int(counts.sum())  # the one device-to-host copy
    row = torch.repeat_interleave(torch.arange(n, device=counts.device), counts,
                                  output_size=total)
    v = vals[:total]
    coef = torch.exp(v - lse[row])
    if g_pz is not None and cfg.need_entropy:
        # d(sum_K q_j z_j)/dz_k = q_k (1 + z_k - sum_K q_j z_j) for k in K
        coef.mul_((v - pz[row] + 1.0) * g_pz[row] + g_lse[row])
    else:
        coef.mul_(g_lse[row])
    t, valid = _valid_targets(targets, vocab)
    gt = torch.where(valid, g_zt, 0.0)
    if cfg.softcap:
        # d(softcap tanh(y / softcap))/dy = 1 - (z T / softcap)^2 at the transformed logit z
        c = cfg.temperature / cfg.softcap
        coef.mul_((v * c).square_().neg_().add_(1.0))
        gt = gt * (zt * c).square_().neg_().add_(1.0)
    # Bags of counts + 1: a row's listed ids, then its target.
    ends = torch.cumsum(counts + 1, dim=0)
    idx = cols.new_empty(total + n)
    g = coef.new_empty(total + n)
    at = torch.arange(total, device=counts.device) + row  # each listed id's slot
    idx[at], g[at] = cols[:total], coef
    idx[ends - 1], g[ends - 1] = t[:, 0], gt
    scale = cfg.logit_scale / cfg.temperature
    if scale != 1.0:
        g *= scale
    dh, dw, db = gathered_grads(hidden, weight, idx, g, ends - counts - 1, need_h, need_w, need_b)
    return (dh if need_h else None), (dw if need_w else None), (db if need_b else None)
