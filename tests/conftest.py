"""Shared fixtures: a per-test random generator (input factories live in reference.py).

Every test gets its own seed, derived from its node id (so runs are reproducible and tests differ
from each other). Set CUTCE_TEST_SEED=<int> to shift all seeds and draw fresh inputs.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch


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
