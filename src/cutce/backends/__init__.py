"""The backends that run a plan: ``torch`` (exact chunked; the CPU path and the oracle) and
``triton`` (the GPU kernels). Neither imports the other; the engine's planner decides, and this
module only says whether Triton can run a call and hands out a backend's functions.

Each backend implements the typed contract of :mod:`cutce.engine.contract`: for the loss and
log-probs (``cutce.backends.<name>.ce`` / ``.ops``) a :class:`~cutce.engine.contract.LossBackend`
(per-token :class:`~cutce.engine.contract.Parts`, and a reduced call's fused total), for
distillation (``.distill`` / ``.distill_ops``) a :class:`~cutce.engine.contract.DistillBackend`.
Both run the :class:`~cutce.engine.planner.Plan` the api hands them.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings

import torch

from ..engine import device as _device
# The names the api and the tests reach through this package; they live in .resources so
# that the Triton modules, which this module loads, import them without importing it back.
from .resources import (KernelResourceError, free_memory, out_of_memory,  # noqa: F401
                        warn_memory_fallback)


def load(name: str, kind: str):
    """The module of backend ``name`` ("torch" | "triton") for ``kind`` ("loss" | "distill");
    the Triton ones import Triton. (Plain imports: torch.compile traces them, not importlib.)"""
    if name == "torch":
        if kind == "loss":
            from .pytorch import ce as module
        else:
            from .pytorch import distill as module
    elif kind == "loss":
        from .triton import ops as module
    else:
        from .triton import distill_ops as module
    return module


class _Coverage(str):
    """A reason that is the call's (its dtypes), not the machine's: no notice under "auto"."""


def triton_reason(hidden, kind: str = "loss", teacher=None, float16: bool = True) -> str | None:
    """Why the Triton kernels cannot run a call whose (student) hidden states are ``hidden``
    (None if they can). Distillation also needs both heads in one dtype and, unless
    ``float16``, not float16. The GPU must be an NVIDIA one of compute capability 8.0 or newer
    (docs/support.md)."""
    if kind == "distill":
        if teacher.dtype != hidden.dtype:
            return _Coverage(
                f"the Triton distillation kernels need both heads in one dtype, got student "
                f"{hidden.dtype} and teacher {teacher.dtype}")
        if hidden.dtype == torch.float16 and not float16:
            # The kernels hand cuBLAS 16-bit logit gradients; a distillation's (q - p) / N
            # entries are all small (no one-hot), and float16's range flushes them (H200: dE
            # error 5e-2 vs 5e-3).
            return _Coverage(
                "the Triton distillation kernels support bfloat16 and float32, not float16 "
                "(its range underflows the per-token logit gradients; use bfloat16 or "
                "impl='torch')")
    if hidden.dtype == torch.float64:
        return _Coverage("the Triton kernels support float16, bfloat16 and float32, not float64 "
                         "(use impl='torch')")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not hidden.is_cuda and not (interpret and hidden.device.type == "cpu"):
        return (f"the Triton kernels need CUDA tensors, got device {hidden.device} "
                "(set TRITON_INTERPRET=1 to run them on CPU tensors through Triton's interpreter)")
    if hidden.is_cuda:
        why = gpu_reason(hidden.device)
        if why is not None:
            return why
    try:
        load("triton", kind)  # the import is the check
    except ImportError as e:
        return f"Triton could not be imported ({e})"
    return None


def gpu_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on this CUDA device (None if they can). AMD GPUs
    (a ROCm build of torch, whose tensors are "cuda" ones) are not served: the kernels use
    NVIDIA-only features (TMA tensor descriptors, bulk stores, NVIDIA tile and stage choices);
    NVIDIA GPUs before Ampere lack the bfloat16 tensor-core dots they are written around."""
    if _device.rocm():
        return (f"the Triton kernels expect an NVIDIA GPU (a CUDA build of torch), got an AMD "
                f"GPU (ROCm {torch.version.hip}, {_device.facts(device).name or device})")
    f = _device.facts(device)
    if f.capability < _device.MIN_CAPABILITY:
        want = "%d.%d" % _device.MIN_CAPABILITY
        return (f"the Triton kernels expect an NVIDIA GPU of compute capability {want} or newer, "
                f"got {f.capability[0]}.{f.capability[1]} ({f.name or device})")
    return None


@functools.lru_cache(maxsize=None)
def warn_torch_fallback(reason):
    # Once per reason: on CUDA the torch path copies the weight and its gradient to float32
    # (~4.7 GB more at a 256k x 2304 head), which a user should hear about, but not every step.
    fix = ", or fix the Triton install" if reason.startswith("Triton could not") else ""
    warnings.warn(f"cutce: impl='auto' runs the torch path on CUDA tensors because {reason}; "
                  f"pass impl='torch' to silence this{fix}", stacklevel=5)


def fallback_notice(reason: str | None) -> None:
    """impl="auto" on CUDA tensors that ran the torch path: a machine the kernels cannot serve
    (a broken Triton install, an AMD or pre-Ampere GPU) is worth a warning (once); a call
    outside the kernels' coverage (float64, mixed dtypes) is not."""
    if reason is not None and not isinstance(reason, _Coverage):
        warn_torch_fallback(reason)


def torch_after_resource_error(err: KernelResourceError, impl: str) -> str:
    """The backend a call whose Triton kernels fit no tile of this GPU runs instead: "torch"
    under impl="auto" (eager calls; warned once per message), else ``err`` is raised: an
    explicit impl="triton" never becomes the torch path, and a compiled graph cannot re-plan."""
    if impl != "auto" or torch.compiler.is_compiling():
        raise err
    warn_torch_fallback(err.reason)
    return "torch"


def torch_if_kernels_do_not_fit(fn):
    """Decorate a function with an ``impl`` argument that dispatches to a backend (the api's
    entry points): when the Triton kernels raise :class:`KernelResourceError` in its forward,
    call it again with impl="torch" under impl="auto" (see :func:`torch_after_resource_error`).
    Nothing of the failed call is kept: the kernels fail at a launch, before they run, and the
    ops allocate their outputs themselves."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except KernelResourceError as err:
            call = sig.bind(*args, **kwargs)
            call.apply_defaults()
            call.arguments["impl"] = torch_after_resource_error(err, call.arguments["impl"])
        return fn(*call.args, **call.kwargs)
    return run
