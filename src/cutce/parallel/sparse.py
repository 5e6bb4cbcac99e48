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
from torch import Tensor

from .collectives import AllGatherRows, SumGradAcrossGroup, check_replicated, fingerprint
from .split import VocabSlice
from ..backends.pytorch.gather import gather_logits

__all__ = ["vocab_parallel_gather"]


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
