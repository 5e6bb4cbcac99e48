"""Shared fixtures: a per-test random generator (input factories live in reference.py).

Every test gets its own seed, derived from its node id (so runs are reproducible and tests differ
from each other). Set CUTCE_TEST_SEED=<int> to shift all seeds and draw fresh inputs.

Without a GPU the Triton kernels run in Triton's interpreter: the switch is set here, once, as
pytest imports this file before any test module (Triton reads it when it is first imported).
"""

from __future__ import annotations

import contextlib
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def gen(request):
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("CUTCE_TEST_SEED", "0"))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return g


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and does not spin against other jobs on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_config():
    """``kernel_config(poison=True, tma=False)``: KernelConfig changes until the test ends
    (cutce.backends.triton.configs.override; a later call applies on top of earlier ones)."""
    from cutce.backends.triton import configs
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(configs.override(**changes))


@pytest.fixture
def poisoned(kernel_config):
    """Launcher allocations filled with NaN: memory a kernel leaves unwritten shows up."""
    kernel_config(poison=True)
