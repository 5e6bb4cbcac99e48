"""The fused strategy's autograd, shared by both backends' fused ops (loss and distillation).

Each fused op returns (total, <non-differentiable values>, *gradients): the gradients of total
formed in its forward. The backward only scales them by the upstream scalar.
"""

from __future__ import annotations

import torch


def fused_setup_context(ctx, inputs, output):
    # Not differentiable: no grad_fn, so ctx holding them makes no reference cycle.
    ctx.mark_non_differentiable(*output[1:])
    # Autograd would otherwise pass zero tensors as the upstream grads of the non-differentiable
    # outputs, one of them dC-sized: a V x D memset in every backward (and its bytes at the peak).
    ctx.set_materialize_grads(False)
    ctx.grads = output[2:]
    ctx.n_inputs = len(inputs)


def fused_backward(ctx, g_total, *_):
    """d(total)/d(hidden, weight, bias) = g_total * (the forward's gradients), scaled in place:
    no second copy of dC. They are handed out once: a second backward through the same call
    raises (use memory_budget=0 to backward twice)."""
    grads = ctx.grads
    if grads is None:
        raise RuntimeError("cutce: this fused loss was already backpropagated (its gradients are "
                           "formed in the forward and handed out once); use memory_budget=0 to "
                           "backward through it twice")
    ctx.grads = None
    if g_total is None:  # no upstream gradient reached the loss (grads are not materialized)
        return (None,) * ctx.n_inputs
    mul_ = getattr(ctx, "scale_", None) or torch.Tensor.mul_  # a backend's faster in-place product
    out = [mul_(g, g_total) if need else None for g, need in zip(grads, ctx.needs_input_grad)]
    return (*out, *[None] * (ctx.n_inputs - 3))
