"""The implementations `cutce bench` compares, each behind one call ``fn(hidden, weight, targets)``
returning the mean cross-entropy loss (a 0-d tensor that backward() can be called on).

A provider says why it cannot run here (``reason``), whether it runs when no ``--providers`` are
named (``off_by_default``), and builds its function lazily, so that peers are imported only when asked
for and a missing one costs nothing but a printed line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import cutce


@dataclass(frozen=True)
class Provider:
    """One implementation under test.

    Attributes:
        name: the name used by ``--providers`` and in the result rows.
        exact: whether its gradients are meant to be exact (False for gradient filtering).
        build: ``build(device) -> fn(hidden, weight, targets) -> loss``.
        reason: ``reason(device) -> str | None``: why it cannot run on that device (None: it can).
        off_by_default: ``off_by_default(device) -> str | None``: why it does not run when
            ``--providers`` is not given (None: it does).
    """

    name: str
    exact: bool
    build: Callable
    reason: Callable = lambda device: None
    off_by_default: Callable = lambda device: None


def _needs_cuda(device) -> str | None:
    return None if torch.device(device).type == "cuda" else "needs a CUDA device"


def _peer(module: str, pip_name: str):
    """``reason`` for a peer package: not installed, or no CUDA (both peers are Triton kernels)."""

    def reason(device):
        if importlib.util.find_spec(module) is None:
            return f"not installed (pip install {pip_name})"
        return _needs_cuda(device)

    return reason


def _cutce(impl: str, **kw):
    def build(device):
        return lambda h, w, t: cutce.linear_cross_entropy(h, w, t, impl=impl, **kw)

    return build


def eager_loss(hidden, weight, targets):
    """What a model does without cutce: materialize the N x V logits, upcast, cross-entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def _native_reason(device) -> str | None:
    if not hasattr(F, "linear_cross_entropy"):
        return (f"torch.nn.functional.linear_cross_entropy is absent in torch {torch.__version__} "
                "(it exists from torch 2.13)")
    return None


def _build_native(chunked: bool):
    """PyTorch's own fused op: its default (``options=None``, the reference path that forms the
    logits) or its chunked path (``options=LinearCrossEntropyOptions()``, default settings)."""

    def build(device):
        if not chunked:
            return lambda h, w, t: F.linear_cross_entropy(h, w, t)
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, t: F.linear_cross_entropy(h, w, t, options=options)

    return build


def _build_compile(device):
    # dynamic=False: each benchmarked N is its own static-shape graph, the fastest that
    # torch.compile can do; the compile time is paid during warm-up, never timed. The runner
    # builds providers once per shape, and the reset keeps a long --sweep-n from hitting
    # dynamo's recompile limit (past it, dynamo silently runs eager code).
    torch._dynamo.reset()
    return torch.compile(eager_loss, dynamic=False)


def _compile_off(device):
    # Compiling forward and backward takes minutes on a few CPU cores; on a GPU it is the
    # strongest non-fused baseline, so it runs by default there.
    if torch.device(device).type != "cuda":
        return "off by default without CUDA: compiling takes minutes on a few CPU cores"
    return None


def _build_apple(exact: bool):
    def build(device):
        from cut_cross_entropy import linear_cross_entropy as apple_lce

        if not exact:
            return lambda h, w, t: apple_lce(h, w, t)
        # Newer releases name their exact mode (no filtering, float32 gradient accumulation)
        # impl="cce_exact"; older ones only have filter_eps=None.
        try:
            from cut_cross_entropy.cce_utils import CCEPresets

            has_exact_impl = "cce_exact" in CCEPresets.names
        except ImportError:
            has_exact_impl = False
        if has_exact_impl:
            return lambda h, w, t: apple_lce(h, w, t, impl="cce_exact")
        return lambda h, w, t: apple_lce(h, w, t, filter_eps=None)

    return build


def _build_liger(device):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def fn(h, w, t):
        out = loss_fn(w, h, t)  # Liger takes (weight, input, target)
        # Some versions return a tuple or an output object when extra outputs are enabled.
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "loss", out)

    return fn


PROVIDERS = {
    p.name: p
    for p in (
        Provider("cutce-torch", True, _cutce("torch")),
        Provider("cutce-triton", True, _cutce("triton"), reason=_needs_cuda),
        # the minimum-memory setting: the recompute strategy (see cutce.engine.planner)
        Provider("cutce-triton-recompute", True, _cutce("triton", memory_budget=0.0), reason=_needs_cuda,
                 off_by_default=lambda device: "the default cutce-triton's minimum-memory setting"),
        # the budget the device's free memory leaves (read once per call): the fastest plan that fits
        Provider("cutce-triton-auto", True, _cutce("triton", memory_budget="auto"), reason=_needs_cuda,
                 off_by_default=lambda device: "cutce-triton at memory_budget='auto'"),
        Provider("cutce-triton-filtered", False, _cutce("triton", filter_eps="auto"), reason=_needs_cuda),
        Provider("torch", True, lambda device: eager_loss),
        Provider("torch-compile", True, _build_compile, off_by_default=_compile_off),
        Provider("torch-native", True, _build_native(chunked=False), reason=_native_reason),
        Provider("torch-native-chunked", True, _build_native(chunked=True), reason=_native_reason),
        Provider("apple-cce", False, _build_apple(exact=False), reason=_peer("cut_cross_entropy", "cut-cross-entropy")),
        Provider("apple-cce-exact", True, _build_apple(exact=True), reason=_peer("cut_cross_entropy", "cut-cross-entropy")),
        Provider("liger", True, _build_liger, reason=_peer("liger_kernel", "liger-kernel")),
    )
}


def parse_provider_names(values) -> list[str]:
    """``--providers`` values, separated by spaces and/or commas; "all" means every provider."""
    names = [n for v in values for n in v.split(",") if n]
    if "all" in names:
        return list(PROVIDERS)
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"--providers: expected names from {list(PROVIDERS)} or 'all', got {unknown}")
    return list(dict.fromkeys(names))  # keep order, drop repeats


def select(names, device) -> tuple[list[Provider], list[tuple[str, str]]]:
    """(providers to run, [(name, why skipped)]) for the device.

    With ``names`` None the default set is taken and off-by-default providers are listed as
    skipped with the way to ask for them; a named provider that cannot run is skipped too (its
    reason is printed), never silently replaced by another.
    """
    chosen, skipped = [], []
    explicit = names is not None
    for name in (names if explicit else PROVIDERS):
        p = PROVIDERS[name]
        why = p.reason(device)
        if why is None and not explicit:
            off = p.off_by_default(device)
            why = None if off is None else f"{off}; ask for it with --providers {name}"
        if why is None:
            chosen.append(p)
        else:
            skipped.append((name, why))
    return chosen, skipped
