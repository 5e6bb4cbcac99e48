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

The patch's options that TRL's fused head carries, warns about or refuses:
:func:`cutce.integrations.trl_forward.fused_options`.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

from .transformers import patch_state
from .transformers.patch_state import wanted

_UTILS = "trl.trainer.utils"
_TRL_INSTALLED: bool | None = None


def patched(obj) -> None:
    """``cutce.transformers.patch`` patched ``obj`` (a class or an instance): bind cutce's hook in
    TRL now if TRL's utilities are loaded, else when they load."""
    patch_state.add(obj)
    utils = sys.modules.get(_UTILS)
    if utils is not None:
        bind(utils, stacklevel=4)
    elif _FINDER not in sys.meta_path and _trl_installed():
        sys.meta_path.insert(0, _FINDER)


def unpatched(obj) -> None:
    """``cutce.transformers.unpatch`` undid ``obj``'s patch: TRL's own hook comes back once no
    patch is left and ``cutce.trl.patch()`` is not in effect."""
    patch_state.discard(obj)
    if not wanted():
        _disarm()
        trl = sys.modules.get("cutce.integrations.trl")
        if trl is not None:
            trl.release_hook()


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
