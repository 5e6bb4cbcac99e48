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

Before all this, the first collective of each call (:func:`_exchange`, the same size on every
rank) carries the layout and a fingerprint of the call's options, so ranks that disagree raise
the same ValueError instead of meeting in collectives of different sizes (a gloo abort, an NCCL
hang).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed as dist

from . import agreement
from .collectives import AllGatherRows, SumGradAcrossGroup, check_replicated, fingerprint, gather
from ..engine.contract import Parts, StatParts
from ..engine.options import Options

__all__ = ["VocabSlice", "combine_parts", "resolve_vocab_parallel", "vocab_parallel_parts", "vocab_slice"]



def _fail(what, expected, got):
    # Same message shape as cutce.api: these helpers are the api's validation of the
    # distributed keywords, kept here so that api.py stays free of torch.distributed details.
    raise ValueError(f"{what}: expected {expected}, got {got}")


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


@dataclasses.dataclass(frozen=True)
class VocabSlice:
    """This rank's place in a vocabulary-parallel layout.

    Attributes:
        group: the ProcessGroup. start, stop: this rank's classes are [start, stop).
        vocab: the whole vocabulary size V. reduce_hidden_grad: whether backward sums dE.
    """

    group: object
    start: int
    stop: int
    vocab: int
    reduce_hidden_grad: bool = True


def _check_sizes(sizes):
    # Every rank sees all sizes, so a bad layout raises on all ranks alike (no rank left waiting
    # in a collective).
    if min(sizes) < 1:
        _fail("weight", "at least one vocabulary row on every rank of the vocabulary split",
              f"local sizes {sizes}")


@agreement.eager
def _exchange(group, head, codes, device):
    """One all-gather of [*head, *codes] (fixed size on every rank); checks that the codes agree
    and returns every rank's head, in group-rank order."""
    mine = torch.tensor([list(head) + list(codes)], dtype=torch.int64, device=device)
    rows = gather(mine, group).view(dist.get_world_size(group), -1).tolist()
    agreement.check([row[len(head):] for row in rows])
    return [row[:len(head)] for row in rows]


def vocab_slice(group, local_vocab: int, vocab_start, device, reduce_hidden_grad=True,
                codes=None) -> VocabSlice:
    """This rank's [start, stop) and the global V, from one all-gather of (start, size) pairs
    and the call's fingerprint (``codes``, from :func:`cutce.parallel.agreement.call_codes`; None: all fields None).

    Done on every call (2 + 2 * len(agreement.FIELDS) int64 per rank, plus a host sync): a cache keyed by
    anything a rank knows alone (its slice size) is unsound, since a rank whose key hits would
    skip the collective that a rank whose key misses waits in. Every rank checks the gathered
    layout and fingerprints, so a bad one raises on every rank alike.
    """
    codes = agreement.call_codes(None, False, False, True, None, None) if codes is None else codes
    pairs = _exchange(group, (-1 if vocab_start is None else vocab_start, local_vocab), codes, device)
    sizes = [n for _, n in pairs]
    _check_sizes(sizes)
    if vocab_start is None:
        starts = [sum(sizes[:r]) for r in range(len(sizes))]
    else:
        starts = [s for s, _ in pairs]
        spans = sorted(zip(starts, sizes))
        edges = [0] + [s + n for s, n in spans[:-1]]
        if -1 in starts or [s for s, _ in spans] != edges:
            _fail("vocab_start", "slices that tile [0, V) without gaps or overlaps "
                  "(the keyword on every rank)", f"(start, size) per rank {pairs}")
    rank = dist.get_rank(group)
    return VocabSlice(group, starts[rank], starts[rank] + sizes[rank], sum(sizes), reduce_hidden_grad)


def _dtensor_slice(weight, mesh_dim, group, reduce_hidden_grad) -> VocabSlice:
    """The slice of a Shard(0) DTensor from its metadata: no communication."""
    from torch.distributed.tensor import Shard

    vocab, world = weight.shape[0], weight.device_mesh.size(mesh_dim)
    # DTensor splits like torch.chunk (uneven: ceil(V / W) rows, fewer on the last ranks).
    split = getattr(Shard, "local_shard_size_and_offset", None) or Shard(0)._local_shard_size_and_offset
    spans = [split(vocab, world, r) for r in range(world)]
    _check_sizes([n for n, _ in spans])
    n, start = spans[weight.device_mesh.get_local_rank(mesh_dim)]
    if n != weight.to_local().shape[0]:
        raise RuntimeError(f"cutce: DTensor local shard has {weight.to_local().shape[0]} rows, "
                           f"expected {n} from its placements")
    return VocabSlice(group, start, start + n, vocab, reduce_hidden_grad)


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
        opts: validated Options. vs: from :func:`vocab_slice`. class_weight: this rank's slice of
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


def _dtensor_cls():
    # No DTensor can exist before its module is imported: checking sys.modules keeps the
    # plain single-device call from importing torch.distributed.tensor (slow to import).
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _layout(name, t):
    """(mesh, mesh dim holding Shard(0) or None) of a DTensor; raises on other layouts."""
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = [i for i, p in enumerate(t.placements) if type(p) is Shard and p.dim == 0]
    others = [p for i, p in enumerate(t.placements) if i not in shard_dims and not isinstance(p, Replicate)]
    if others or len(shard_dims) > 1:
        _fail(f"{name} placements", "Replicate, or Shard(0) on one mesh dimension and Replicate "
              "on the others", tuple(t.placements))
    return t.device_mesh, (shard_dims[0] if shard_dims else None)


def replicated_local(name, t):
    """``t`` as a plain tensor: a DTensor input that every rank holds whole (Replicate) becomes
    its local tensor; other placements raise. Anything else is returned as it is."""
    DTensor = _dtensor_cls()
    if DTensor is None or not isinstance(t, DTensor):
        return t
    if any(not p.is_replicate() for p in t.placements):
        _fail(f"{name} placements", "Replicate (redistribute first, or pass the local tensor "
              "with reduce_hidden_grad=False for sequence-parallel layouts)", tuple(t.placements))
    return t.to_local()


def resolve_vocab_parallel(hidden, weight, bias, targets, token_weights, vocab_group, vocab_start,
                           reduce_hidden_grad, opts=None, shift=False, return_lse=False,
                           class_weight=None, tname="targets", temperature=None):
    """Validate the distributed keywords, unwrap DTensors, and locate this rank's slice.

    A weight that is a DTensor with Shard(0) on one mesh dimension is vocabulary-parallel over that
    dimension's group (its local shard is this rank's slice; uneven shards are fine; the offsets
    come from its metadata); a replicated DTensor is used as its local (full) tensor. Hidden
    states, targets and token weights may be replicated DTensors. Bias follows the weight (a
    DTensor with the weight's placements, or a plain tensor holding this rank's slice).
    With ``vocab_group`` and plain tensors, the slice comes from :func:`vocab_slice` (collective).

    Either way the first collective of a split call is one fixed-size all-gather that carries a
    fingerprint of the call (``opts``, ``shift``, ``return_lse``, ``reduce_hidden_grad``, whether
    per-token ``temperature`` is given (unwrapped by the caller, :func:`replicated_local`), grad
    mode, hidden's shape/dtype/requires_grad, autocast): ranks that disagree all raise the same
    ValueError naming the field, before any collective whose size depends on them.

    Returns:
        (hidden, weight, bias, targets, token_weights, vs): plain tensors, and a
        :class:`VocabSlice` (None when the call is not vocabulary-parallel).
    """
    if not isinstance(reduce_hidden_grad, bool):
        _fail("reduce_hidden_grad", "a bool", repr(reduce_hidden_grad))
    if vocab_group is not None and not isinstance(vocab_group, dist.ProcessGroup):
        _fail("vocab_group", "None or a torch.distributed.ProcessGroup", type(vocab_group).__name__)
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                    or vocab_start < 0):
        _fail("vocab_start", "None or an int >= 0", repr(vocab_start))
    if vocab_start is not None and vocab_group is None:
        _fail("vocab_start", "None unless vocab_group is given", repr(vocab_start))
    DTensor = _dtensor_cls()
    vs = None
    if DTensor is not None and isinstance(weight, DTensor):
        mesh, dim = _layout("weight", weight)
        if isinstance(bias, DTensor) and tuple(bias.placements) != tuple(weight.placements):
            _fail("bias placements", f"the weight's {tuple(weight.placements)}", tuple(bias.placements))
        if dim is not None:
            group = mesh.get_group(dim)
            if vocab_group is not None and (dist.get_process_group_ranks(vocab_group)
                                            != dist.get_process_group_ranks(group)):
                _fail("vocab_group", "None or the group of the weight's Shard(0) mesh dimension "
                      f"(ranks {dist.get_process_group_ranks(group)})",
                      f"ranks {dist.get_process_group_ranks(vocab_group)}")
            if vocab_start is not None:
                _fail("vocab_start", "None with a Shard(0) DTensor weight (it knows its offsets)",
                      repr(vocab_start))
            vs = _dtensor_slice(weight, dim, group, reduce_hidden_grad)
        weight = weight.to_local()
        device = weight.device
    if DTensor is not None and isinstance(bias, DTensor):
        _layout("bias", bias)
        if vs is None and any(not p.is_replicate() for p in bias.placements):
            _fail("bias placements", "Replicate unless the weight is a Shard(0) DTensor", tuple(bias.placements))
        bias = bias.to_local()
    hidden, targets, token_weights = (replicated_local(name, t) for name, t in (
        ("hidden", hidden), (tname, targets), ("token_weights", token_weights)))
    if vs is None and vocab_group is None:
        return hidden, weight, bias, targets, token_weights, None
    codes = agreement.call_codes(opts, shift, return_lse, reduce_hidden_grad, hidden, token_weights,
                                 class_weight, temperature)
    if vs is None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            _fail("weight", "a 2-D tensor (this rank's vocabulary slice)",
                  tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__)
        vs = vocab_slice(vocab_group, weight.shape[0], vocab_start, weight.device, reduce_hidden_grad,
                         codes)
    else:  # the DTensor knows the layout; the exchange only checks the fingerprints
        _exchange(vs.group, (), codes, device)
    return hidden, weight, bias, targets, token_weights, vs
