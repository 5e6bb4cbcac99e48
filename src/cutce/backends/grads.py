"""What every custom op's autograd shares: gradients returned by argument name
(:func:`by_name`), and the fused strategy's backward (loss and distillation).

Each fused op returns (total, <non-differentiable values>, *gradients): the gradients of total
formed in its forward. The backward only scales them by the upstream scalar.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _arguments(op) -> tuple[str, ...]:
    return tuple(a.name for a in op._opoverload._schema.arguments)


def by_name(op, **grads) -> tuple:
    """A custom op's backward result: the gradients given by argument name, in the op's
    argument order, None for every other argument (so that an argument added to the op cannot
    shift a gradient onto the wrong input, or leave one short)."""
    names = _arguments(op)
    unknown = set(grads) - set(names)
    assert not unknown, f"{op._name} has no argument {sorted(unknown)}"
    return tuple(grads.get(n) for n in names)


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
    # the fused ops' first three arguments are the head (hidden, weight, bias), in this order
    out = [mul_(g, g_total) if need else None for g, need in zip(grads, ctx.needs_input_grad)]
    return (*out, *[None] * (ctx.n_inputs - len(out)))
