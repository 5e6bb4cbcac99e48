"""``cutce.transformers.patch`` under TRL: a patched model keeps cutce's head when TRL hooks it.

Why this exists
---------------
Since TRL 1.15 the trainers call the model with ``fused_lm_head=True`` after TRL's
``add_fused_lm_head`` has rebound its ``forward``: that call runs the backbone and TRL's own head
and never reaches the patched loss. So while a model or class is patched by
``cutce.transformers.patch`` and TRL is loaded, cutce's hook is bound in TRL's modules in place
of TRL's (the binding of ``cutce.trl.patch()``, :mod:`cutce.integrations.trl`). The hook hands a
patched model to cutce's fused forward with the patch's ``impl`` and ``memory_budget``, and every
other model to TRL's own hook (or to cutce's, while ``cutce.trl.patch()`` is in effect). When the
last patch is undone (and ``cutce.trl.patch()`` is not in effect) TRL's hook is bound again.

TRL takes seconds to import, so patching never imports it. When TRL is installed but its trainer
utilities are not loaded yet, a finder on ``sys.meta_path`` binds the hook right after
``trl.trainer.utils`` has run, before any trainer module imports the name from it. Without TRL
installed nothing happens. A TRL whose hook cutce does not support gets a warning that names
``cutce.trl.patch()``, never a silent fall-back to TRL's head.

The patch's options under TRL's fused head
------------------------------------------
TRL's trainers build their losses from the hook's per-token log-probs, not from the model's loss.
``impl`` and ``memory_budget`` carry over. ``filter_eps`` and ``chunk_bytes`` tune the loss's
speed and memory only; the fused head has no counterpart, computes the exact values without them
and says so in a warning. Options that change the loss (``label_smoothing``, ``z_loss``,
``class_weight``) or the head (``vocab_group``, ``vocab_start``, ``reduce_hidden_grad``) have no
place in per-token log-probs: hooking such a model raises ``ValueError``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import sys
import warnings
import weakref

import torch

_UTILS = "trl.trainer.utils"
CARRIED = ("impl", "memory_budget")
TUNING = ("filter_eps", "chunk_bytes")

# What is patched now: classes by strong reference (unpatch() removes them), instances weakly,
# so that a model dropped without unpatch() stops holding TRL's hook once it is collected.
_CLASSES: set = set()
_INSTANCES: weakref.WeakSet = weakref.WeakSet()
_TRL_INSTALLED: bool | None = None


def patched(obj) -> None:
    """``cutce.transformers.patch`` patched ``obj`` (a class or an instance): bind cutce's hook in
    TRL now if TRL's utilities are loaded, else when they load."""
    (_CLASSES if isinstance(obj, type) else _INSTANCES).add(obj)
    utils = sys.modules.get(_UTILS)
    if utils is not None:
        bind(utils, stacklevel=4)
    elif _FINDER not in sys.meta_path and _trl_installed():
        sys.meta_path.insert(0, _FINDER)


def unpatched(obj) -> None:
    """``cutce.transformers.unpatch`` undid ``obj``'s patch: TRL's own hook comes back once no
    patch is left and ``cutce.trl.patch()`` is not in effect."""
    (_CLASSES if isinstance(obj, type) else _INSTANCES).discard(obj)
    if not wanted():
        _disarm()
        trl = sys.modules.get("cutce.integrations.trl")
        if trl is not None:
            trl.release_hook()


def wanted() -> bool:
    """Whether a class or a live instance is patched by ``cutce.transformers.patch``."""
    return bool(_CLASSES) or len(_INSTANCES) > 0


def bind(utils, stacklevel: int) -> None:
    """Bind cutce's hook in TRL's modules; a TRL that cutce does not support warns instead."""
    from . import trl

    try:
        trl.bind_hook(utils)
    except trl.UnsupportedTRLError as e:
        warnings.warn(
            f"cutce.transformers.patch cannot reach TRL's own LM head: {e}. A patched model "
            "called with labels still computes cutce's loss, but a TRL trainer that computes the "
            "head itself (a fused or chunked loss) bypasses it. cutce.trl.patch() is the route for "
            f"TRL's trainers ({trl.SUPPORTED}); the INFO line of the 'cutce' logger shows when "
            "cutce computes a model's head", stacklevel=stacklevel + 1)


def fused_options(options: dict, model) -> dict:
    """The patch's options that TRL's fused head uses (``impl``, ``memory_budget``): a warning
    for the tuning options it has no counterpart for, ``ValueError`` for those that change what
    is computed, when set to other than their default."""
    from ..api import linear_cross_entropy

    params = inspect.signature(linear_cross_entropy).parameters
    given = {k: v for k, v in options.items() if k not in params or not _is_default(v, params[k].default)}
    name = type(model).__name__
    refused = sorted(set(given) - set(CARRIED) - set(TUNING))
    if refused:
        got = ", ".join(f"{k}={_show(given[k])}" for k in refused)
        raise ValueError(
            f"{name}: TRL's trainers build their losses from the per-token log-probs of its fused "
            f"LM head, where cutce.transformers.patch's {refused} have no place; expected a model "
            f"patched without them under TRL (label smoothing there: the trainer's "
            f"label_smoothing_factor), got {got}")
    dropped = sorted(set(given) & set(TUNING))
    if dropped:
        warnings.warn(f"{name}: cutce.transformers.patch's {dropped} tune the loss; TRL's fused LM "
                      "head computed by cutce has no such option and computes exact values "
                      "without them", stacklevel=4)
    return {k: v for k, v in options.items() if k in CARRIED}


def _is_default(value, default) -> bool:
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return value is default
    return isinstance(value, bool) == isinstance(default, bool) and value == default


def _show(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def _trl_installed() -> bool:
    global _TRL_INSTALLED
    if _TRL_INSTALLED is None:  # asked once: find_spec reads the file system
        try:
            _TRL_INSTALLED = "trl" in sys.modules or importlib.util.find_spec("trl") is not None
        except (ImportError, ValueError):  # a broken or spec-less "trl" on the path
            _TRL_INSTALLED = False
    return _TRL_INSTALLED


def _disarm() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``trl.trainer.utils`` with the other finders and wraps its loader in
    :class:`_BindAfter`, which takes this finder off ``sys.meta_path`` once the module has run
    (a ``find_spec`` alone, loading nothing, leaves it armed)."""

    def find_spec(self, name, path, target=None):
        if name != _UTILS:
            return None
        for finder in [f for f in sys.meta_path if f is not self]:
            find = getattr(finder, "find_spec", None)
            spec = None if find is None else find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _BindAfter(spec.loader)
        return spec


class _BindAfter(importlib.abc.Loader):
    """A loader that runs the real one, then binds cutce's hook in the module it loaded."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _disarm()
        if wanted():
            bind(module, stacklevel=2)

    def __getattr__(self, attr):  # get_source, get_filename, ...: the real loader's
        return getattr(self._loader, attr)


_FINDER = _Finder()
