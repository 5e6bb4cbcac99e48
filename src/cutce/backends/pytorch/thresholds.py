"""Each row's kept set under a sampler's truncation, from one chunk of its logits.

The kept set is ``{j : z_j >= thr}`` with ``thr`` the smallest kept logit (so ties at the line
are kept, whatever order a sort gives them). vLLM's order: min-p on the probabilities, then
top-k among what min-p left, then top-p on the softmax of what top-k left (see
:class:`cutce.engine.options.Options`).

Top-p needs the row sorted only down to where its nucleus ends. The candidates are top-k's k
logits when top-k is on, else the row's largest logits, as many as each tier of
:data:`TOP_P_CANDIDATES` in turn; a row whose nucleus reaches past them all (a flat
distribution) is sorted whole, as the sampler does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Candidates of top-p without top-k, tried in turn: a row whose nucleus reaches past the first
# takes the second, then a sort. Selecting 1024 of 152k logits costs a few passes over the row
# where a sort costs a radix sort of values with int64 indices; most rows' nucleus at
# top_p <= 0.95 is far smaller, and flat rows (high temperatures) get a second chance at 8192.
TOP_P_CANDIDATES = (1024, 8192)


class Kept(NamedTuple):
    """A chunk's kept sets: ``thr`` (r,) the smallest kept logit per row; with top-k, ``vals``
    (r, k): the k largest logits left by min-p (``-inf`` where it dropped one). Logits tied with
    the k-th beyond these k are kept too: ``z >= thr`` decides."""

    thr: torch.Tensor
    vals: torch.Tensor | None


def find(z, cfg) -> Kept:
    """The kept sets of a chunk's logits z (r, V) under ``cfg``'s ``min_p``, ``top_k``,
    ``top_p``."""
    neg_inf = float("-inf")
    thr = z.new_full((z.shape[0],), neg_inf)
    drop = None
    if cfg.min_p is not None:
        # In probabilities, as the sampler compares them (not z - zmax >= log(min_p), which
        # rounds differently at the boundary).
        p = torch.softmax(z, dim=1)
        drop = p < p.amax(dim=1, keepdim=True) * cfg.min_p
        del p
        thr = z.masked_fill(drop, float("inf")).amin(dim=1)
    vals = None
    if cfg.top_k is not None and cfg.top_k < z.shape[1]:
        # The k-th largest of what min-p left; -inf when fewer than k are left (then top-k
        # drops nothing more). Sorted for top-p, which walks them from the largest.
        zk = z if drop is None else z.masked_fill(drop, neg_inf)
        vals = torch.topk(zk, cfg.top_k, dim=1, sorted=cfg.top_p is not None).values
        del zk
        thr = torch.maximum(thr, vals.amin(dim=1))
    if cfg.top_p is not None:
        thr = _top_p(z, thr, vals, cfg.top_p)
    return Kept(thr, vals)


def line(top_p: float, dtype) -> float:
    """1 - top_p in the logits' dtype, as the sampler forms it: a sorted prefix whose
    cumulative mass is at or below it is dropped."""
    one = torch.ones((), dtype=dtype)
    return float(one - torch.tensor(top_p, dtype=dtype))


def tails(vals, live, rest, tot):
    """(r, c) the mass of each candidate and everything below it, the sampler's ascending
    cumulative sum read from the top: ``vals`` descending, ``live`` where a candidate is in the
    set top-p sees, ``rest`` (r,) that set's mass outside the candidates, ``tot`` (r,) its
    exponentials' sum relative to ``vals[:, :1]``."""
    p = torch.where(live, torch.exp(vals - vals[:, :1]), 0.0).div_(tot[:, None])
    return p.flip(1).cumsum_(dim=1).flip(1).add_(rest[:, None])


def _top_p(z, thr, vals, top_p, tiers=None):
    """thr of top-p over ``{z >= thr}`` (the set min-p and top-k left), from top-k's sorted
    candidates ``vals`` or, without them, from each tier of :data:`TOP_P_CANDIDATES` in turn."""
    if vals is None:
        tiers = TOP_P_CANDIDATES if tiers is None else tiers
        if not tiers:
            return _top_p_sorted(z, thr, top_p)
        vals = torch.topk(z, min(tiers[0], z.shape[1]), dim=1, sorted=True).values
    else:
        tiers = ()
    live_all = z >= thr[:, None]
    count = live_all.sum(dim=1)
    live = vals >= thr[:, None]
    n_live = live.sum(dim=1)
    m = vals[:, 0]
    tot = torch.where(live_all, torch.exp(z - m[:, None]), 0.0).sum(dim=1)
    del live_all
    # What top-p sees below the candidates (none when they hold the whole set).
    e_in = torch.where(live, torch.exp(vals - m[:, None]), 0.0).sum(dim=1)
    rest = torch.where(count > n_live, (tot - e_in).clamp_(min=0.0) / tot, 0.0)
    kept = (tails(vals, live, rest, tot) > line(top_p, z.dtype)) & live
    r = kept.sum(dim=1, keepdim=True).clamp_(min=1)  # the largest is always kept
    out = vals.gather(1, r - 1).squeeze(1)
    if not tiers:
        return out  # top-k's: past its k candidates only their ties with the k-th are left
    # Resolved unless every live candidate is kept and the set goes on below them with
    # smaller logits (ties with the last candidate are kept by z >= thr anyway).
    open_rows = (r.squeeze(1) == n_live) & (count > n_live) & (out > thr)
    rows = open_rows.nonzero().squeeze(1)
    if rows.numel():
        out[rows] = _top_p(z[rows], thr[rows], None, top_p, tiers[1:])
    return out


def _top_p_sorted(z, thr, top_p):
    """thr of top-p from the rows sorted whole."""
    # Sorting z and then dropping the smallest (those below thr lead the ascending row) gives
    # the masked row's sort without a masked copy. NaN goes to -inf, as a masked copy had it.
    srt = torch.sort(z, dim=1).values
    srt.masked_fill_((srt >= thr[:, None]).logical_not_(), float("-inf"))
    cum = torch.softmax(srt, dim=1).cumsum_(dim=1)
    # The first sorted position whose cumulative mass exceeds the line; the largest is always
    # kept. Cumulative sums of non-negative numbers never decrease, so the count of positions
    # at or below the line is that position.
    first = (cum <= line(top_p, z.dtype)).sum(dim=1, keepdim=True).clamp_(max=z.shape[1] - 1)
    del cum
    return srt.gather(1, first).squeeze(1)
