"""Which backend runs a validated call: the Triton path or the torch path, and whether a
training call takes the fused strategy's function (see :mod:`cutce.engine.planner`). api.py validates
the user's input before anything here runs; an explicit impl="triton" that cannot run raises
here and says why (never a silent fallback).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from ..engine import planner as plan
from .torch import ce as torch_impl


def triton_unavailable_reason(hidden) -> str | None:
    if hidden.dtype == torch.float64:
        return "the Triton kernels support float16, bfloat16 and float32, not float64 (use impl='torch')"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not hidden.is_cuda and not (interpret and hidden.device.type == "cpu"):
        return (f"the Triton kernels need CUDA tensors, got device {hidden.device} "
                "(set TRITON_INTERPRET=1 to run them on CPU tensors through Triton's interpreter)")
    try:
        from .triton import ops  # noqa: F401  (the import is the check)
    except ImportError as e:
        return f"Triton could not be imported ({e})"
    return None


@functools.lru_cache(maxsize=None)
def warn_torch_fallback(reason):
    # Once per reason: on CUDA the torch path copies the weight and its gradient to float32
    # (~4.7 GB more at a 256k x 2304 head), which a user should hear about, but not every step.
    warnings.warn(f"cutce: impl='auto' runs the torch path on CUDA tensors because {reason}; "
                  "pass impl='torch' to silence this, or fix the Triton install", stacklevel=5)


def backend(impl, hidden):
    """The parts function for a validated ``impl`` ("auto" | "torch" | "triton")."""
    # "auto" never picks Triton for CPU tensors: answer before the import check, which
    # torch.compile cannot trace when Triton is missing.
    if impl == "torch" or (impl == "auto" and not hidden.is_cuda):
        return torch_impl.linear_lse_parts
    reason = triton_unavailable_reason(hidden)
    if impl == "triton" and reason is not None:
        raise RuntimeError(f"impl='triton' cannot run: {reason}")
    if impl == "auto" and reason is not None:
        if reason.startswith("Triton could not"):
            warn_torch_fallback(reason)
        return torch_impl.linear_lse_parts
    from .triton import ops

    return ops.linear_lse_parts


def fused_backend(backend, h2, weight, bias, opts):
    """The training-call function (gradients formed in the forward, see cutce.engine.planner) when this
    call can use it, else None. Under torch.compile only static facts decide (never the number
    of tokens, so that compile does not specialize on it) and the backend plans at run time,
    possibly running the recompute kernels inside; in eager code the plan decides here."""
    need = [t is not None and t.requires_grad for t in (h2, weight, bias)]
    if opts.memory_budget == 0 or not torch.is_grad_enabled() or not any(need):
        return None  # forward only: the recompute forward is already a single product
    triton_path = backend is not torch_impl.linear_lse_parts
    if triton_path and (opts.label_smoothing or h2.dtype not in (torch.bfloat16, torch.float32)):
        return None  # the Triton fused kernel covers neither (documented on memory_budget)
    if not torch.compiler.is_compiling():
        # Eager: N is known, so a call the plan would not fuse keeps the recompute strategy's
        # own backward (gradients allocated in the backward, not held from the forward on).
        n, d = h2.shape
        p = plan.plan(n, weight.shape[0], d, h2.dtype, "triton" if triton_path else "torch", True,
                      opts.memory_budget, need[0], need[1], opts.chunk_bytes)
        if not p.fused:
            return None
    if not triton_path:
        return torch_impl.fused_loss
    from .triton import ops
    return ops.fused_loss


def row_prologue(fused, opts, class_weight):
    """For a fused call on the Triton path in eager code without class weights: the one-launch
    row coefficients and targets flag (cutce.backends.triton.rows.row_coefs), else None (torch ops:
    cutce.engine.loss.row_coefs and the api's targets check). Under torch.compile the torch ops stay,
    for the compiler to fuse."""
    if (fused is None or fused is torch_impl.fused_loss or class_weight is not None
            or opts.label_smoothing or torch.compiler.is_compiling()):
        return None
    from .triton import rows
    return rows.row_coefs
