"""Where a call's classifier rows live: the vocabulary split of one head, or of a distillation's two.

Every vocabulary-parallel function (the loss, the log-probs, the truncated log-probs, both
distillations) locates its split here, through :func:`resolve`, and nowhere else. A split call's
first collective is one all-gather of a fixed number of int64s per rank: this rank's rows, the
teacher's rows (a distillation's; placeholders otherwise) and the call's fingerprint
(:mod:`cutce.parallel.agreement`). Every rank then checks the same gathered values, so a bad
layout, a teacher split unlike the student's or ranks that disagree on an option raise the same
ValueError on every rank before any collective whose size depends on them (a gloo abort or an NCCL
hang otherwise).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import agreement
from .collectives import gather

__all__ = ["LAYOUT_INTS", "Resolved", "VocabSlice", "fail", "replicated_local", "resolve",
           "vocab_slice"]


def fail(what, expected, got):
    # The api's message shape; these are the api's checks of the distributed keywords, kept
    # here so that the api stays free of torch.distributed details.
    raise ValueError(f"{what}: expected {expected}, got {got}")


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


class Resolved(NamedTuple):
    """:func:`resolve`'s answer: plain tensors, this rank's slice (None when the call is not
    split) and the teacher's (hidden, weight, bias) for a distillation (None otherwise)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    token_weights: torch.Tensor | None
    vs: VocabSlice | None
    teacher: tuple | None = None


# The layout's int64s per rank, ahead of the fingerprint: (vocab_start or -1, rows) of the
# student, (start, rows, same group) of the teacher. A teacher start of _NO_TEACHER marks a call
# without one, _STUDENT_ROWS plain teacher tensors, which hold the student's rows by convention.
LAYOUT_INTS = 5
_NO_TEACHER, _STUDENT_ROWS = -1, -2


def _check_sizes(sizes):
    # Every rank sees all sizes, so a bad layout raises on all ranks alike.
    if min(sizes) < 1:
        fail("weight", "at least one vocabulary row on every rank of the vocabulary split",
             f"local sizes {sizes}")


@agreement.eager
def _exchange(group, layout, codes, device):
    """One all-gather of [*layout, *codes] (the same size on every rank); checks that the codes
    agree and returns every rank's layout, in group-rank order."""
    mine = torch.tensor([list(layout) + list(codes)], dtype=torch.int64, device=device)
    rows = gather(mine, group).view(dist.get_world_size(group), -1).tolist()
    agreement.check([row[len(layout):] for row in rows])
    return [row[:len(layout)] for row in rows]


def _starts(pairs, vocab_start):
    """Each rank's first class from the gathered (vocab_start or -1, rows) pairs."""
    sizes = [n for _, n in pairs]
    _check_sizes(sizes)
    if vocab_start is None:
        return [sum(sizes[:r]) for r in range(len(sizes))]
    starts = [s for s, _ in pairs]
    spans = sorted(zip(starts, sizes))
    edges = [0] + [s + n for s, n in spans[:-1]]
    if -1 in starts or [s for s, _ in spans] != edges:
        fail("vocab_start", "slices that tile [0, V) without gaps or overlaps "
             "(the keyword on every rank)", f"(start, size) per rank {pairs}")
    return starts


def vocab_slice(group, local_vocab: int, vocab_start, device, reduce_hidden_grad=True,
                codes=None) -> VocabSlice:
    """This rank's [start, stop) and the global V, from one all-gather of the layout and the
    call's fingerprint (``codes``, from :func:`cutce.parallel.agreement.call_codes`; None: all
    fields None).

    Done on every call (a host sync): a cache keyed by anything a rank knows alone (its slice
    size) is unsound, since a rank whose key hits would skip the collective that a rank whose
    key misses waits in.
    """
    codes = agreement.call_codes(None, False, False, True, None, None) if codes is None else codes
    layout = (-1 if vocab_start is None else vocab_start, local_vocab, _NO_TEACHER, -1, 1)
    rows = _exchange(group, layout, codes, device)
    return _slice_of(group, rows, vocab_start, reduce_hidden_grad)[0]


def _slice_of(group, rows, vocab_start, reduce_hidden_grad):
    """(this rank's VocabSlice, every rank's (start, rows)) from the gathered layouts."""
    spans = list(zip(_starts([r[:2] for r in rows], vocab_start), [r[1] for r in rows]))
    start, n = spans[dist.get_rank(group)]
    return VocabSlice(group, start, start + n, sum(n for _, n in spans), reduce_hidden_grad), spans


def dtensor_cls():
    # No DTensor can exist before its module is imported: checking sys.modules keeps the
    # plain single-device call from importing torch.distributed.tensor (slow to import).
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _placements(name, t):
    """(mesh, mesh dim holding Shard(0) or None) of a DTensor; raises on other layouts."""
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = [i for i, p in enumerate(t.placements) if type(p) is Shard and p.dim == 0]
    others = [p for i, p in enumerate(t.placements)
              if i not in shard_dims and not isinstance(p, Replicate)]
    if others or len(shard_dims) > 1:
        fail(f"{name} placements", "Replicate, or Shard(0) on one mesh dimension and Replicate "
             "on the others", tuple(t.placements))
    return t.device_mesh, (shard_dims[0] if shard_dims else None)


def _dtensor_slice(weight, mesh_dim, group, reduce_hidden_grad) -> VocabSlice:
    """The slice of a Shard(0) DTensor from its metadata: no communication."""
    from torch.distributed.tensor import Shard

    vocab, world = weight.shape[0], weight.device_mesh.size(mesh_dim)
    # DTensor splits like torch.chunk (uneven: ceil(V / W) rows, fewer on the last ranks).
    split = (getattr(Shard, "local_shard_size_and_offset", None)
             or Shard(0)._local_shard_size_and_offset)
    spans = [split(vocab, world, r) for r in range(world)]
    _check_sizes([n for n, _ in spans])
    n, start = spans[weight.device_mesh.get_local_rank(mesh_dim)]
    if n != weight.to_local().shape[0]:
        raise RuntimeError(f"cutce: DTensor local shard has {weight.to_local().shape[0]} rows, "
                           f"expected {n} from its placements")
    return VocabSlice(group, start, start + n, vocab, reduce_hidden_grad)


def replicated_local(name, t):
    """``t`` as a plain tensor: a DTensor input that every rank holds whole (Replicate) becomes
    its local tensor; other placements raise. Anything else is returned as it is."""
    DTensor = dtensor_cls()
    if DTensor is None or not isinstance(t, DTensor):
        return t
    if any(not p.is_replicate() for p in t.placements):
        fail(f"{name} placements", "Replicate (redistribute first, or pass the local tensor "
             "with reduce_hidden_grad=False for sequence-parallel layouts)", tuple(t.placements))
    return t.to_local()


def _unwrap_head(prefix, weight, bias, reduce_hidden_grad=True):
    """(weight, bias, the slice of a Shard(0) DTensor weight or None), as plain tensors."""
    DTensor = dtensor_cls()
    vs = None
    if DTensor is not None and isinstance(weight, DTensor):
        mesh, dim = _placements(f"{prefix}weight", weight)
        if isinstance(bias, DTensor) and tuple(bias.placements) != tuple(weight.placements):
            fail(f"{prefix}bias placements", f"the {prefix}weight's {tuple(weight.placements)}",
                 tuple(bias.placements))
        if dim is not None:
            vs = _dtensor_slice(weight, dim, mesh.get_group(dim), reduce_hidden_grad)
        weight = weight.to_local()
    if DTensor is not None and isinstance(bias, DTensor):
        _placements(f"{prefix}bias", bias)
        if vs is None and any(not p.is_replicate() for p in bias.placements):
            fail(f"{prefix}bias placements", f"Replicate unless {prefix}weight is a Shard(0) "
                 "DTensor", tuple(bias.placements))
        bias = bias.to_local()
    return weight, bias, vs


def _check_keywords(vocab_group, vocab_start, reduce_hidden_grad):
    if not isinstance(reduce_hidden_grad, bool):
        fail("reduce_hidden_grad", "a bool", repr(reduce_hidden_grad))
    if vocab_group is not None and not isinstance(vocab_group, dist.ProcessGroup):
        fail("vocab_group", "None or a torch.distributed.ProcessGroup", type(vocab_group).__name__)
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                    or vocab_start < 0):
        fail("vocab_start", "None or an int >= 0", repr(vocab_start))
    if vocab_start is not None and vocab_group is None:
        fail("vocab_start", "None unless vocab_group is given", repr(vocab_start))


def _ranks(group):
    return dist.get_process_group_ranks(group)


def resolve(hidden, weight, bias, targets, token_weights, vocab_group, vocab_start,
            reduce_hidden_grad, *, opts=None, shift=False, return_lse=False, class_weight=None,
            tname="targets", temperature=None, teacher=None, facts=None) -> Resolved:
    """Validate the distributed keywords, unwrap DTensors, and locate this rank's slice.

    A weight that is a DTensor with Shard(0) on one mesh dimension is vocabulary-parallel over
    that dimension's group (its local shard is this rank's slice; uneven shards are fine); a
    replicated DTensor is used as its local (full) tensor. Hidden states, targets and token
    weights may be replicated DTensors. Bias follows the weight (a DTensor with the weight's
    placements, or a plain tensor holding this rank's slice). With ``vocab_group`` and plain
    tensors the slice comes from the ranks' layouts, gathered.

    ``teacher``: a distillation's (hidden, weight, bias) as the caller passed them. Its rows
    must be the student's on every rank: a Shard(0) DTensor of the same layout, or plain tensors
    holding as many rows as the student's slice.

    A split call's one collective here carries the layout and the fingerprint of the call:
    ``opts``, ``shift``, ``return_lse``, ``reduce_hidden_grad``, whether token weights, class
    weights or per-token ``temperature`` are given (the latter unwrapped by the caller), grad
    mode, hidden's shape/dtype/requires_grad, autocast, and ``facts`` (the function's own
    values by :data:`cutce.parallel.agreement.FACTS` name).
    """
    _check_keywords(vocab_group, vocab_start, reduce_hidden_grad)
    weight, bias, vs = _unwrap_head("", weight, bias, reduce_hidden_grad)
    if vs is not None:
        if vocab_group is not None and _ranks(vocab_group) != _ranks(vs.group):
            fail("vocab_group", "None or the group of the weight's Shard(0) mesh dimension "
                 f"(ranks {_ranks(vs.group)})", f"ranks {_ranks(vocab_group)}")
        if vocab_start is not None:
            fail("vocab_start", "None with a Shard(0) DTensor weight (it knows its offsets)",
                 repr(vocab_start))
    hidden, targets, token_weights = (replicated_local(name, t) for name, t in (
        ("hidden", hidden), (tname, targets), ("token_weights", token_weights)))
    t_layout = (_NO_TEACHER, -1, 1)
    if teacher is not None:
        teacher, t_layout = _unwrap_teacher(*teacher, vs, vocab_group)
    if vs is None and vocab_group is None:
        return Resolved(hidden, weight, bias, targets, token_weights, None, teacher)
    codes = agreement.call_codes(opts, shift, return_lse, reduce_hidden_grad, hidden,
                                 token_weights, class_weight, temperature, facts)
    if vs is None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            fail("weight", "a 2-D tensor (this rank's vocabulary slice)",
                 tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__)
        mine = (-1 if vocab_start is None else vocab_start, weight.shape[0], *t_layout)
        rows = _exchange(vocab_group, mine, codes, weight.device)
        vs, student = _slice_of(vocab_group, rows, vocab_start, reduce_hidden_grad)
    else:  # the DTensor knows the layout; the exchange checks the fingerprints and the teacher
        rows = _exchange(vs.group, (vs.start, vs.stop - vs.start, *t_layout), codes, weight.device)
        student = [tuple(r[:2]) for r in rows]
    if teacher is not None:
        _check_teacher_rows(student, [r[2:] for r in rows])
    return Resolved(hidden, weight, bias, targets, token_weights, vs, teacher)


def _unwrap_teacher(ht, wt, bt, vs, vocab_group):
    """The teacher's plain tensors and its layout ints (start, rows, same group as the
    student's): a Shard(0) DTensor knows them; plain tensors hold the student's rows."""
    placements = getattr(wt, "placements", None)  # a DTensor's, for the message below
    wt, bt, tvs = _unwrap_head("teacher_", wt, bt)
    span = None
    if tvs is not None:
        if vs is None and vocab_group is None:
            fail("teacher_weight placements", "no Shard(0) unless student_weight is split by "
                 "vocabulary too (both heads split alike)", tuple(placements))
        student_group = vs.group if vs is not None else vocab_group
        span = (tvs.start, tvs.stop - tvs.start,
                int(_ranks(tvs.group) == _ranks(student_group)))
    ht = replicated_local("teacher_hidden", ht)
    if span is None:
        span = (_STUDENT_ROWS, wt.shape[0] if isinstance(wt, torch.Tensor) and wt.dim() == 2
                else -1, 1)
    return (ht, wt, bt), span


def _check_teacher_rows(student, teacher):
    """Raise alike on every rank unless each rank's teacher rows are its student rows."""
    same_group = all(t[2] for t in teacher)
    rows = [(s[0] if t[0] == _STUDENT_ROWS else t[0], t[1]) for s, t in zip(student, teacher)]
    if rows != student or not same_group:
        where = "" if same_group else " over another process group"
        fail("teacher_weight", f"the student_weight's vocabulary split ((start, rows) per group "
             f"rank: {student})", f"{rows}{where}")
