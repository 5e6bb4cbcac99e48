"""Vocabulary parallelism for a few logits per token (the stored-teacher distillation).

Conventions are :mod:`cutce.parallel.vocab`'s: each rank holds the rows [start, stop) of the
classifier, the hidden states and the class ids are the same on every rank, and the result is
the unsplit one on every rank. A token's logit at class j is computed by the rank that owns j
(0 elsewhere); one all-gather of the (K, N) partial logits, summed in rank order, gives every
rank the same whole logits. Backward: each rank's slice gets its rows' gradient, and the hidden
states' gradient (each rank's share from the ids it owns) is summed over the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import AllGatherRows, SumGradAcrossGroup, check_replicated, fingerprint, gather
from .vocab import VocabSlice, _fail
from . import agreement
from ..backends.pytorch.gather import gather_logits

__all__ = ["agree", "vocab_parallel_gather"]


def vocab_parallel_gather(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor,
                          scale: float, vs: VocabSlice) -> Tensor:
    """(N, K) logits ``scale * (hidden . weight[ids] + bias[ids])`` of the unsplit classifier
    from this rank's rows (0 where ids is -1), equal on every rank; checks that the hidden
    states are the same on every rank. Differentiable as described in the module's docstring."""
    if vs.reduce_hidden_grad and hidden.requires_grad:
        hidden = SumGradAcrossGroup.apply(hidden, vs.group)
    mine = (ids >= vs.start) & (ids < vs.stop)
    part = gather_logits(hidden, weight, bias, torch.where(mine, ids - vs.start, -1), scale)
    rows = torch.cat([part.T, fingerprint(hidden).to(part.dtype)[None]])
    every = AllGatherRows.apply(rows, vs.group)  # (W, K + 1, N)
    check_replicated(every[:, -1].detach())
    return every[:, :-1].sum(dim=0).T


@agreement.eager
def agree(vs: VocabSlice, fields: dict, device) -> None:
    """One fixed-size all-gather of the call's own options (ints, floats, bools or None, by
    name): ranks that disagree raise the same ValueError, naming the first field, before any
    collective whose size depends on them."""
    codes = [c for name, v in fields.items() for c in agreement._encode(name, v)]
    mine = torch.tensor([codes], dtype=torch.int64, device=device)
    rows = gather(mine, vs.group).view(dist.get_world_size(vs.group), -1).tolist()
    for i, name in enumerate(fields):
        vals = [tuple(r[2 * i:2 * i + 2]) for r in rows]
        if any(v != vals[0] for v in vals):
            _fail(name, "the same value on every rank of the vocabulary split",
                  f"{[agreement._decode(name, *v) for v in vals]} (per group rank)")
