"""The collectives every vocabulary-parallel computation shares: an all-gather of per-token rows
(plain and differentiable), the hidden states' gradient summed over the group, and the check
that the ranks hold the same hidden states (a fingerprint of them rides in the same all-gather).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch >= 2.13 renames all_gather_into_tensor to all_gather_single (same semantics).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather(x: torch.Tensor, group) -> torch.Tensor:
    """(k, N) from every rank -> (W, k, N) in group-rank order (not differentiable)."""
    world = dist.get_world_size(group)
    out = x.new_empty(world * x.numel())
    # The flat (concatenated) output form is the one every backend (gloo, NCCL) accepts.
    _all_gather_flat(out, x.contiguous().reshape(-1), group=group)
    return out.view(world, *x.shape)


class AllGatherRows(torch.autograd.Function):
    """Differentiable all-gather of replicated-loss inputs: (k, N) -> (W, k, N).

    Backward returns this rank's block of the upstream gradient: the loss built from the gathered
    tensor is the same on every rank, so the gradient of our own rows is already complete here
    (summing it over ranks would multiply it by W)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank = dist.get_rank(group)
        return gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None


class SumGradAcrossGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over ``group``.

    Applied to the hidden states before the local backend: each rank's backend yields the part
    of dE that comes from its vocabulary slice, and dE is the sum of these parts."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # A copy: the incoming buffer may be shared with other consumers of the graph.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def fingerprint(hidden):
    """(N,) float32 projection of the hidden states on a fixed vector: one GEMV, no N x D copy."""
    probe = torch.cos(torch.arange(hidden.shape[1], device=hidden.device, dtype=torch.float32))
    return (hidden.detach() @ probe.to(hidden.dtype)).float()


def check_replicated(prints):
    """Raise on every rank alike if the ranks' fingerprints (W, N) disagree.

    The silent failure this catches: tokens that differ per rank (a data-parallel batch, or an
    FSDP2-sharded weight passed outside its module's forward, which is a DTensor sharded on dim 0
    over the data-parallel mesh and so looks like a vocabulary split). The tolerance admits
    replicas that differ in low bits (non-deterministic kernels upstream); NaN rows pass (they
    may be ignored tokens)."""
    ref = prints[0]
    bad = (prints - ref).abs() > 1e-2 * (ref.abs() + ref.abs().mean())
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "cutce: hidden states differ across the vocabulary group")
    elif bool(bad.any()):
        raise ValueError(
            "hidden: expected the same hidden states on every rank of the vocabulary split (is "
            "the weight an FSDP2-sharded parameter used outside its module's forward? pass "
            "weight.full_tensor() or compute the loss inside forward), got different ones on "
            f"group ranks {bad.any(dim=1).nonzero().flatten().tolist()}")
