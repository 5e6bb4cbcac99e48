"""A kernel that does not fit its GPU runs with smaller tiles: the one place that handles it.

The presets are sized from what the device reports (:func:`configs.preset_for`), and
tools/gpu_compile.py holds every kernel of each known architecture within its shared memory;
this is the net under both, for a part whose facts or compiler differ from those checked.
Triton raises ``OutOfResources`` when a compiled kernel needs more shared memory (or, through
its registers, fewer threads) than the device allows; it does so at the launch, before the
kernel runs, so the op can start over. :func:`fits` wraps each custom op's body (the forward
and the backward alike): on ``OutOfResources`` it runs the op again with every matrix tile one
step smaller (:func:`smaller`) down to :data:`configs.MINIMAL_TILE`, warns once, and raises
:class:`~cutce.backends.KernelResourceError` when even that does not fit, which the api turns
into the torch path under impl="auto" (:func:`cutce.backends.torch_after_resource_error`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

import torch
from triton.runtime.errors import OutOfResources

from ..resources import KernelResourceError
from . import configs

# the KernelConfig fields that hold a matrix (tl.dot) tile: the ones that take shared memory
GEMM_TILES = tuple(f.name for f in dataclasses.fields(configs.KernelConfig)
                   if "TileConfig" in str(f.type))


def smaller_tile(t: configs.TileConfig) -> configs.TileConfig | None:
    """One step down: 2 pipeline stages (their buffers are most of the shared memory), then the
    wider of BLOCK_N / BLOCK_V halved, then BLOCK_K, then 1 stage; None at the floor."""
    floor = configs.MINIMAL_TILE
    if t.num_stages > 2:
        return dataclasses.replace(t, num_stages=2)
    n, v, k, stages = t.block_n, t.block_v, t.block_k, t.num_stages
    if max(n - floor.block_n, v - floor.block_v) > 0:
        if v - floor.block_v >= n - floor.block_n:
            v //= 2
        else:
            n //= 2
    elif k > floor.block_k:
        k //= 2
    elif stages > floor.num_stages:
        stages = floor.num_stages
    else:
        return None
    warps = max(floor.num_warps, min(t.num_warps, n * v // 512))
    return configs.TileConfig(n, v, k, warps, stages)


def smaller(cfg: configs.KernelConfig) -> configs.KernelConfig | None:
    """cfg with every matrix tile one step smaller (:func:`smaller_tile`); None when all are at
    the floor."""
    changes = {}
    for name in GEMM_TILES:
        t = getattr(cfg, name)
        if t is not None and (s := smaller_tile(t)) is not None:
            changes[name] = s
    return dataclasses.replace(cfg, **changes) if changes else None


_WARNED: set = set()


def _warn_once(device: torch.device, err: OutOfResources) -> None:
    # Once per device: the forward and the backward of a call, and every later call, would
    # otherwise repeat it.
    key = str(device)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"cutce: a Triton kernel did not fit {_name(device)} ({err}); running "
                      "with smaller tiles, which is slower: please report this GPU", stacklevel=2)


def _name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"device {device}"
    from ...engine.device import facts
    f = facts(device)
    return f"{f.name or device} (sm_{f.arch}, {f.shared_memory} bytes of shared memory per block)"


def fits(op):
    """Decorate a custom op's body: on OutOfResources, run it again with smaller tiles (see the
    module docstring). Its first argument is a tensor on the device it launches on."""
    @functools.wraps(op)
    def run(*args, **kwargs):
        try:
            return op(*args, **kwargs)
        except OutOfResources as err:
            first = err
        device = args[0].device
        cfg, last = configs.current(device), first
        while (cfg := smaller(cfg)) is not None:
            try:
                with configs.override(cfg):
                    out = op(*args, **kwargs)
            except OutOfResources as err:
                last = err
                continue
            _warn_once(device, first)
            return out
        raise KernelResourceError(
            f"the Triton kernels do not fit {_name(device)}: expected a kernel within its limits "
            f"at the smallest tile, got {last}") from last
    # torch.library reads the op's schema from the signature: resolved here, as this module's
    # names are not the op's
    run.__signature__ = inspect.signature(op, eval_str=True)
    return run
