"""What a call may use of its device, and the errors and warnings when it falls short: the free
memory the planner budgets against, the out-of-memory error that names the plan, and the error of
a Triton kernel that fits no tile of the GPU. Both backends and the api import it; it imports only
the engine.
"""

from __future__ import annotations

import warnings

import torch

from ..engine import planner


class KernelResourceError(RuntimeError):
    """A Triton kernel needed more of the GPU (shared memory, registers) than it has, even at
    the smallest tile (:mod:`cutce.backends.triton.fit`). ``reason``: why, as a clause."""

    def __init__(self, reason: str):
        super().__init__(f"cutce: {reason}; pass impl='torch' to run this call on the torch path")
        self.reason = reason


def free_memory(device: torch.device) -> int | None:
    """Bytes a call may still allocate on ``device``: the driver's free memory plus what
    PyTorch's caching allocator holds unused; None off CUDA (no device memory to plan for)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


_MEMORY_WARNED: set = set()


def warn_memory_fallback(why: str, key) -> None:
    """Warn once per ``key`` (the budget asked for and the backend): a training loop repeats
    the same call every step, with free memory that moves a little."""
    if key not in _MEMORY_WARNED:
        _MEMORY_WARNED.add(key)
        warnings.warn(why, stacklevel=5)


def out_of_memory(err: Exception, hidden, weight, need_h: bool, need_w: bool, memory_budget,
                  backend: str) -> torch.OutOfMemoryError:
    """The error to raise when a call of these (N, D) hidden states and (V, D) weight at its
    minimum (recompute) strategy ran out of device memory: the planner's account of what it
    needs and what was free, instead of an allocator's message from deep inside a kernel
    launcher (kept at the end)."""
    msg = planner.out_of_memory_in_op(backend, hidden.shape[0], weight.shape[0], hidden.shape[1],
                                      hidden.dtype, need_h, need_w, memory_budget,
                                      free_memory(hidden.device))
    return torch.OutOfMemoryError(f"{msg} ({str(err).splitlines()[0][:160]})")
