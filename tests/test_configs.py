"""The kernels' tuning values: presets per device, and the one way to change them (override)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

pytest.importorskip("triton")

from cutce.backends.triton import configs  # noqa: E402
from cutce.backends.triton.configs import TileConfig  # noqa: E402


def test_presets_keep_the_measured_values():
    h = configs.HOPPER
    assert h.tile("fwd", torch.bfloat16) == TileConfig(128, 256, 64, 8, 3)
    assert h.tile("bwd", torch.bfloat16) == h.tile("fwd", torch.bfloat16)
    assert h.tile("bwd_entropy", torch.bfloat16) == TileConfig(128, 128, 64, 8, 4)
    assert h.tile("bwd_entropy", torch.float32) == h.tile("fwd", torch.float32)  # via bwd
    assert h.tile("fwd", torch.float32) == TileConfig(128, 64, 32, 8, 3)
    assert h.tile("distill", torch.bfloat16) == TileConfig(128, 128, 64, 8, 4)
    assert h.tile("distill_fused", torch.bfloat16) == TileConfig(128, 128, 64, 8, 5)
    assert h.tile("distill_fused", torch.float32) == TileConfig(64, 64, 32, 4, 3)
    assert (h.tma, h.flatten, h.loss_tile_store, h.distill_tile_store) == (None, True, False, True)
    assert (h.dz_programs_per_sm, h.distill_dz_programs_per_sm) == (1, 0)
    a = configs.PRE_HOPPER
    assert a.tma is False and a.tile("distill_fused", torch.bfloat16).num_stages == 4
    assert dataclasses.replace(a, tma=None, distill_fused_tile=h.distill_fused_tile,
                               bwd_entropy_tile=h.bwd_entropy_tile) == h
    i = configs.INTERPRETER
    assert i.tile("bwd", torch.float32) == configs.INTERPRETER_TILE
    assert i.tile("bwd_entropy", torch.bfloat16) == configs.INTERPRETER_TILE
    if configs.interpreting():
        assert configs.current("cpu") is configs.INTERPRETER


def test_override_is_scoped_nested_and_checked():
    base = configs.current("cpu")
    with configs.override(tma=False, poison=True):
        assert configs.current("cpu") == dataclasses.replace(base, tma=False, poison=True)
        with configs.override(poison=False, max_chunk_v=512):
            cfg = configs.current("cpu")
            assert (cfg.tma, cfg.poison, cfg.max_chunk_v) == (False, False, 512)
        with configs.override(configs.HOPPER, vocab_splits=3):
            assert configs.current("cpu") == dataclasses.replace(configs.HOPPER, vocab_splits=3)
        assert configs.current("cpu").poison
    assert configs.current("cpu") == base
    with pytest.raises(TypeError):
        with configs.override(no_such_field=1):
            pass
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.tma = True


def test_override_does_not_leak_into_other_threads():
    seen = []
    with configs.override(poison=True):
        t = threading.Thread(target=lambda: seen.append(configs.current("cpu").poison))
        t.start()
        t.join()
        assert configs.current("cpu").poison
    assert seen == [False]


def test_override_reaches_the_backward():
    """The backward of an op launched inside the block sees the override (on CUDA the autograd
    engine runs it on a device thread)."""
    seen = []
    x = torch.ones(3, requires_grad=True, device="cuda" if torch.cuda.is_available() else "cpu")

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(configs.current(g.device).max_chunk_v)
            return g * 2

    with configs.override(max_chunk_v=7):
        Probe.apply(x).sum().backward()
    Probe.apply(x).sum().backward()  # and not after the block
    assert seen == [7, configs.current(x.device).max_chunk_v] and seen[1] != 7
