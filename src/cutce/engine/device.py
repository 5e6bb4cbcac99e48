"""What a GPU offers the kernels, as facts: the input of the kernel presets
(:func:`cutce.backends.triton.configs.preset_for`) and of the backend choice.

A preset follows from these facts, not from a product name or a major version: an RTX 5090
(sm_120) is newer than an H100 but has the shared memory of an A10, and a tile sized for one
does not launch on the other. :data:`TARGETS` lists the architectures whose every kernel is
compiled and checked against its limit without a GPU (tools/gpu_compile.py); docs/support.md
says which of them were also run.
"""

from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """capability: (major, minor); shared_memory: bytes of shared memory one block may use
    (the opt-in limit, cudaDevAttrMaxSharedMemoryPerBlockOptin); tma: tensor descriptors
    (the Tensor Memory Accelerator, sm_90 and newer); name: for messages."""

    capability: tuple[int, int]
    shared_memory: int
    tma: bool
    name: str = ""

    @property
    def arch(self) -> int:
        """The capability as Triton's target number: (9, 0) -> 90."""
        return 10 * self.capability[0] + self.capability[1]


# The opt-in shared memory per block of each compute capability (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability"): the fallback where a torch build does not
# report it. sm_90's was read on an H100.
SHARED_MEMORY_OPTIN = {(7, 0): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376,
                       (8, 7): 166912, (8, 9): 101376, (9, 0): 232448, (10, 0): 232448,
                       (10, 3): 232448, (12, 0): 101376, (12, 1): 101376}


def nvidia_facts(capability: tuple[int, int], name: str = "",
                 shared_memory: int | None = None) -> DeviceFacts:
    """An NVIDIA GPU's facts from its capability and its reported shared memory (None: the
    table's, or for a capability it lacks the 48 KiB every GPU offers, which takes the
    smallest preset)."""
    capability = tuple(capability)
    if shared_memory is None:
        shared_memory = SHARED_MEMORY_OPTIN.get(capability, 49152)
    return DeviceFacts(capability, shared_memory, capability >= (9, 0), name)


# The architectures tools/gpu_compile.py compiles every kernel for, with example parts.
TARGETS = {
    80: (nvidia_facts((8, 0)), "A100, A30"),
    86: (nvidia_facts((8, 6)), "A10, A40, RTX A6000, RTX 3090"),
    89: (nvidia_facts((8, 9)), "L4, L40S, RTX 6000 Ada, RTX 4090"),
    90: (nvidia_facts((9, 0)), "H100, H200, GH200"),
    100: (nvidia_facts((10, 0)), "B200, GB200"),
    120: (nvidia_facts((12, 0)), "RTX 5090, RTX PRO 6000 Blackwell"),
}
# The oldest capability the kernels serve: bfloat16 tensor-core dots start with Ampere.
MIN_CAPABILITY = (8, 0)


def rocm() -> bool:
    """Whether this torch is a ROCm build: its "cuda" tensors live on AMD GPUs."""
    return getattr(torch.version, "hip", None) is not None


def facts(device: torch.device) -> DeviceFacts:
    """The facts of a CUDA device (cached: the query costs host time on every launch)."""
    return _facts(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _facts(index: int) -> DeviceFacts:
    props = torch.cuda.get_device_properties(index)
    if rocm():  # no tensor descriptors; the backend choice keeps these devices off the kernels
        return DeviceFacts((props.major, props.minor),
                           getattr(props, "shared_memory_per_block", 65536), False, props.name)
    return nvidia_facts((props.major, props.minor), props.name,
                        getattr(props, "shared_memory_per_block_optin", None))
