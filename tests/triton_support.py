"""Where the tests run and whether Triton is there: the torch-path tests never depend on it."""

from __future__ import annotations

import pytest
import torch

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
# the implementations a parametrized test compares: Triton's only where it is installed
IMPLS = ["torch"] + (["triton"] if HAS_TRITON else [])
