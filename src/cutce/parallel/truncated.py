"""A truncated sampler's log-probs (min-p, top-k, top-p) with the classifier split by vocabulary.

The kept set of a row is ``{j : z_j >= thr}`` (see :class:`cutce.engine.options.Options`), so
the ranks only need to agree on one threshold per token; then each rank runs the single-device op
on its slice with that threshold and the slices' parts combine as the untruncated ones do
(:func:`cutce.parallel.vocab.combine_parts`): lse = logsumexp_r lse_r, pz = sum_r e^(lse_r - lse)
pz_r, zt and "kept" from the owner of the target. The thresholds, per chunk of tokens, without
any logits leaving a rank:

    max and sum of exp   all-reduce (max, sum) of (N,) values
    min-p                each rank's smallest kept logit, all-reduce (min)
    top-k                each rank's k largest, all-gathered (W x N x k), the k-th of those
    top-p                bisection on the bit patterns of the threshold (32 rounds in float32,
                         64 in float64), each an all-reduce (sum) of the mass at or below it

The bisection ends on two adjacent floating-point numbers, so the kept set is exact for the
masses it computes; they are sums in another order than on one device, so a token whose
cumulative mass lies within rounding of 1 - top_p may fall the other way. Not differentiated:
the kept set is piecewise constant.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import AllGatherRows, SumGradAcrossGroup, check_replicated, fingerprint, gather
from .split import VocabSlice
from ..backends.pytorch import truncated
from ..engine.options import Options


def _codes(x):
    """Floats -> integers of the same order (+0 and -0 alike), in int64."""
    bits = x.view(torch.int32 if x.dtype == torch.float32 else torch.int64).to(torch.int64)
    top = 2**31 - 1 if x.dtype == torch.float32 else 2**63 - 1
    return torch.where(bits < 0, -(bits & top), bits)


def _floats(code, dtype):
    """The inverse of :func:`_codes`."""
    if dtype == torch.float32:
        bits = torch.where(code < 0, -code - 2**31, code).to(torch.int32)
        return bits.view(torch.float32)
    sign = torch.iinfo(torch.int64).min
    return torch.where(code < 0, (-code) | sign, code).view(torch.float64)


def _all(x, group, op):
    dist.all_reduce(x, op=op, group=group)
    return x


def _chunk_thresholds(z, cfg, vocab, group):
    """(r,) thresholds of one chunk's rows from this rank's (r, V_r) logits."""
    sum_, max_, min_ = dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN
    neg_inf = float("-inf")
    m = _all(z.amax(dim=1), group, max_)
    thr = _all(z.amin(dim=1), group, min_)
    if cfg.min_p is not None:
        e = torch.exp(z - m[:, None])
        total = _all(e.sum(dim=1), group, sum_)
        p = e.div_(total[:, None])  # softmax over the whole vocabulary; its max is 1 / total
        drop = p < (1.0 / total)[:, None] * cfg.min_p
        del p, e
        thr = _all(z.masked_fill(drop, float("inf")).amin(dim=1), group, min_)
    if cfg.top_k is not None and cfg.top_k < vocab:
        k = cfg.top_k
        zk = torch.where(z >= thr[:, None], z, neg_inf)
        top = torch.topk(zk, min(k, z.shape[1]), dim=1).values
        if top.shape[1] < k:  # a slice narrower than k
            top = torch.cat([top, top.new_full((top.shape[0], k - top.shape[1]), neg_inf)], 1)
        every = gather(top, group)  # (W, r, k)
        kth = torch.topk(every.permute(1, 0, 2).reshape(top.shape[0], -1), k, dim=1).values[:, -1]
        thr = torch.maximum(thr, kth)
    if cfg.top_p is not None:
        keep = z >= thr[:, None]
        srt, order = torch.sort(torch.where(keep, z, neg_inf), dim=1)
        cum = torch.where(keep, torch.exp(z - m[:, None]), 0.0).gather(1, order).cumsum_(dim=1)
        del order, keep
        total = _all(cum[:, -1].clone(), group, sum_)
        one = torch.ones((), dtype=z.dtype)
        line = float(one - torch.tensor(cfg.top_p, dtype=z.dtype))
        # Invariant: every token at or below floats(lo) is dropped (its mass at or below,
        # ties included, is <= line); the token at floats(hi) is kept, unless even the max is
        # dropped (a top_p below the rounding of 1), when hi stays at the max: it is kept.
        lo, hi = _codes(thr) - 1, _codes(m)
        for _ in range(33 if z.dtype == torch.float32 else 64):
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
            at = torch.searchsorted(srt, _floats(mid, z.dtype)[:, None], right=True)
            below = torch.where(at > 0, cum.gather(1, (at - 1).clamp_(min=0)), 0.0)[:, 0]
            dropped = _all(below, group, sum_) / total <= line
            lo, hi = torch.where(dropped, mid, lo), torch.where(dropped, hi, mid)
        thr = _floats(hi, z.dtype)
    return thr


def chunk_rows(hidden, cfg, vs: VocabSlice) -> int:
    """Tokens per chunk, from the whole vocabulary: every rank takes the same chunks (their
    collectives pair up), and the slice's op takes them too (the same products as here)."""
    return truncated.chunk_rows(hidden.shape[0], vs.vocab, truncated.compute_dtype(hidden.dtype),
                                cfg, hidden.device)


def thresholds(hidden, weight, bias, cfg, vs: VocabSlice, rows: int):
    """(N,) thresholds over the whole vocabulary, the same on every rank (no gradient)."""
    n = hidden.shape[0]
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        hd = truncated.head(hidden.detach(), weight.detach(),
                            None if bias is None else bias.detach())
        out = hidden.new_empty(n, dtype=truncated.compute_dtype(hidden.dtype))
        for s in range(0, n, rows):
            e = min(s + rows, n)
            z, _ = truncated.chunk_logits(hd, s, e, cfg)
            out[s:e] = _chunk_thresholds(z, cfg, vs.vocab, vs.group)
    return out


def vocab_parallel_truncated_parts(hidden, weight, bias, targets, opts: Options, vs: VocabSlice):
    """(lse, zt, pz, kept) of the whole vocabulary's truncated distribution, equal on every
    rank (see :func:`cutce.backends.pytorch.truncated.truncated_parts`). Backward gives weight
    and bias their slice's gradient and hidden the full one (this rank's share without
    ``vs.reduce_hidden_grad``).

    The ranks' top_k, top_p and min_p, which size the collectives below, were checked equal by
    the call's agreement exchange (they are ``Options`` fields, so its fingerprint holds them)."""
    cfg = truncated.make_cfg(opts)
    rows = chunk_rows(hidden, cfg, vs)
    thr = thresholds(hidden, weight, bias, cfg, vs, rows)
    if vs.reduce_hidden_grad and hidden.requires_grad:
        hidden = SumGradAcrossGroup.apply(hidden, vs.group)
    mine = (targets >= vs.start) & (targets < vs.stop)
    local = torch.where(mine, targets - vs.start, -1)
    lse_r, zt_r, pz_r, kept_r = truncated.truncated_parts(hidden, weight, bias, local, opts,
                                                          thr=thr, rows=rows)
    rows = [lse_r, zt_r, pz_r, kept_r.to(lse_r.dtype), fingerprint(hidden).detach().to(lse_r.dtype)]
    every = AllGatherRows.apply(torch.stack(rows), vs.group)  # (W, 5, N)
    check_replicated(every[:, -1].detach())
    lse = torch.logsumexp(every[:, 0], dim=0)
    pz = (torch.exp(every[:, 0] - lse) * every[:, 2]).sum(dim=0)
    return lse, every[:, 1].sum(dim=0), pz, every[:, 3].detach().sum(dim=0) > 0
