"""Vocabulary parallelism: the loss over a classifier split by vocabulary across a process group.

Each rank of ``group`` holds a contiguous slice ``weight[start:stop]`` (and ``bias[start:stop]``)
of the classifier; the slices tile ``[0, V)``. Hidden states and targets are the same on every
rank. Every rank runs the ordinary local backend on its slice, which yields the O(N) parts of the
backend contract (see :mod:`cutce.backends.pytorch.ce`) for its slice only::

    lse_r, zt_r, zsum_r, pz_r        each (N,), over the classes start_r <= j < stop_r

and :func:`combine_parts` turns them into the parts of the whole vocabulary with one all-gather of
a (k, N) float tensor (k = 3: lse_r, zt_r and a fingerprint of the hidden states that checks they
are the same on every rank; plus 1 with label smoothing, plus 1 with entropy)::

    lse  = logsumexp_r lse_r            zt = sum_r zt_r  (only the owner's is non-zero)
    zsum = sum_r zsum_r                 pz = sum_r exp(lse_r - lse) * pz_r

With the per-token statistics (``opts.need_stats``, not differentiable; +4 rows)::

    lse2 = logsumexp_r lse2_r           zmax = max_r zmax_r
    amax = the smallest global argmax amax_r among the ranks whose zmax_r == zmax

The api then forms the loss from these replicated parts exactly as on one device, so every option
(label smoothing, z-loss, token weights, reductions, ignore_index) is unchanged. Backward: autograd
sends each rank the gradient of its own lse_r/zt_r/..., the local backend turns it into dC and
dbias of its slice and a partial dE, and :class:`SumGradAcrossGroup` all-reduces dE (unless the
caller asked to do that itself). Never communicated: the weight, its gradient, or any logits.

Gradient convention: every rank computes the same (replicated) loss, and its backward is the
gradient of that one loss, not of the sum over ranks; so the collectives' backward passes the
upstream gradient through unscaled (it is the same on every rank).

Before all this, :func:`cutce.parallel.split.resolve` has located this rank's slice in one
collective that also checks that every rank made the same call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import AllGatherRows, SumGradAcrossGroup, check_replicated, fingerprint
from .split import VocabSlice
from ..engine.contract import Parts, StatParts
from ..engine.options import Options

__all__ = ["combine_parts", "sum_over_group", "vocab_parallel_parts"]

def combine_parts(parts, group, opts: Options, replicated=None):
    """Combine per-slice backend parts into whole-vocabulary parts, differentiably.

    Args:
        parts: (lse_r, zt_r, zsum_r, pz_r), each (N,) float32/float64, this rank's slice's values
            of the backend contract (zt_r = 0 where the target is not in the slice); with
            ``opts.need_stats`` also (lse2_r, zmax_r, amax_r), amax_r as a *global* class id
            (int64; :func:`vocab_parallel_parts` adds the slice's start).
        group: the ProcessGroup whose ranks hold the slices.
        opts: selects which parts are communicated (zsum only with label smoothing, pz only with
            entropy); the others are returned as zeros, as a backend would.
        replicated: None or an (N,) fingerprint of inputs that must be the same on every rank
            (see :func:`fingerprint`); it rides along in the same all-gather and is checked.

    Returns:
        (lse, zt, zsum, pz), each (N,), identical on every rank; with ``opts.need_stats`` also
        (lse2, zmax, amax) of the whole vocabulary (not differentiable; amax the first global
        argmax, as torch.argmax over the unsplit logits). One all-gather of k*N floats
        (k = 2, +1 with label smoothing, +1 with entropy, +1 with ``replicated``, +4 with the
        statistics: lse2_r, zmax_r and amax_r's high and low 24 bits, each exact in float32).
    """
    lse_r, zt_r, zsum_r, pz_r = parts.lse, parts.zt, parts.zsum, parts.pz
    rows = [lse_r, zt_r]
    if opts.need_zsum:
        rows.append(zsum_r)
    if opts.need_entropy:
        rows.append(pz_r)
    n_stats = 4 if opts.need_stats else 0
    if opts.need_stats:
        lse2_r, zmax_r, amax_r = (p.detach() for p in (parts.lse2, parts.zmax, parts.amax))
        rows += [lse2_r, zmax_r, (amax_r >> _IDX_BITS).to(lse_r.dtype),
                 (amax_r & (2**_IDX_BITS - 1)).to(lse_r.dtype)]
    if replicated is not None:
        rows.append(replicated.detach().to(lse_r.dtype))
    every = AllGatherRows.apply(torch.stack(rows), group)  # (W, k, N)
    if replicated is not None:
        check_replicated(every[:, -1].detach())
    lses = every[:, 0]
    lse = torch.logsumexp(lses, dim=0)
    zt = every[:, 1].sum(dim=0)
    zsum = every[:, 2].sum(dim=0) if opts.need_zsum else torch.zeros_like(lse)
    if opts.need_entropy:
        # sum_j p_j z_j over the whole vocabulary = sum_r (Z_r / Z) * (sum_{j in r} p^(r)_j z_j).
        pz = (torch.exp(lses - lse) * every[:, 2 + opts.need_zsum]).sum(dim=0)
    else:
        pz = torch.zeros_like(lse)
    if not opts.need_stats:
        return Parts(lse, zt, zsum, pz)
    k = every.shape[1] - n_stats - (replicated is not None)
    st = every[:, k:k + n_stats].detach()  # (W, 4, N)
    lse2 = torch.logsumexp(st[:, 0], dim=0)
    zmax = st[:, 1].amax(dim=0)
    ids = (st[:, 2].to(torch.int64) << _IDX_BITS) + st[:, 3].to(torch.int64)
    # ties between ranks go to the smallest global index (the slices may be in any rank order)
    amax = torch.where(st[:, 1] == zmax, ids, torch.iinfo(torch.int64).max).amin(dim=0)
    return StatParts(lse, zt, zsum, pz, lse2, zmax, amax)


# a global class id travels in the float all-gather as two halves of this many bits, each exact
# in float32 (ids below 2**48)
_IDX_BITS = 24


def sum_over_group(x: torch.Tensor, vs: VocabSlice) -> torch.Tensor:
    """x summed over the ranks of the split (not differentiable: for constants such as class
    weights' per-token values and total, each rank holding its slice's share)."""
    x = x.detach().clone()
    dist.all_reduce(x, group=vs.group)
    return x


def vocab_parallel_parts(backend, hidden, weight, bias, targets, opts: Options, vs: VocabSlice,
                         class_weight=None, inv_temp=None):
    """The backend contract for the whole vocabulary, computed from this rank's slice.

    Args:
        backend: a local backend (``torch_impl.linear_lse_parts`` or the Triton op).
        hidden: (N, D), the same on every rank. weight: (stop - start, D); bias: (stop - start,)
            or None. targets: (N,) int64 global class ids (or ignore_index).
        opts: validated Options. vs: from :func:`cutce.parallel.split.resolve`. class_weight: this rank's slice of
            the class weights (stop - start,) or None (weights the zsum part). inv_temp: None or
            (N,) per-token inverse temperatures, the same on every rank (as hidden).

    Returns:
        (lse, zt, zsum, pz), each (N,), equal on every rank to the unsplit backend's result
        (with ``opts.need_stats`` also lse2, zmax, amax; amax a global class id).
        Backward gives weight/bias their slice's gradient and hidden the full dE (the sum over
        ranks; only this rank's share if ``vs.reduce_hidden_grad`` is False).
    """
    if vs.reduce_hidden_grad and hidden.requires_grad:
        hidden = SumGradAcrossGroup.apply(hidden, vs.group)
    mine = (targets >= vs.start) & (targets < vs.stop)
    # -1 for targets another rank owns (and ignore_index): the backend then gives zt_r = 0.
    local = torch.where(mine, targets - vs.start, -1)
    parts = backend(hidden, weight, bias, local, opts, class_weight=class_weight, inv_temp=inv_temp)
    if opts.need_stats:  # the local argmax as a global class id
        parts = parts._replace(amax=parts.amax + vs.start)
    return combine_parts(parts, vs.group, opts, replicated=fingerprint(hidden))
