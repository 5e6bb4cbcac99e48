"""What ``cutce.transformers.patch`` has patched, and with which options.

:mod:`~cutce.integrations.transformers.patching` writes this state and TRL's hook
(:mod:`cutce.integrations.trl`) reads it to pick a model's head. Both import it from here because
the patch binds that hook (through :mod:`cutce.integrations.trl_route`): were the hook to read the
patching module, each would import the other.
"""

from __future__ import annotations

import weakref

from .heads import transformers_model

# The route name a patched model's first call logs, also when TRL's hook computes its head.
ROUTE = "cutce.transformers.patch"
# The attribute of a patched forward that holds its patch's state.
_MARK = "_cutce_patch"

# Classes by strong reference (unpatch() removes them), instances weakly, so that a model dropped
# without unpatch() stops holding TRL's hook once it is collected.
_CLASSES: set = set()
_INSTANCES: weakref.WeakSet = weakref.WeakSet()


def patch_options(model_or_class) -> dict | None:
    """The loss options a patched class or instance (or PEFT model) was patched with; None when
    it is not patched."""
    state = _patch_of(getattr(transformers_model(model_or_class), "forward", None))
    return None if state is None else dict(state.options)


def _patch_of(forward):
    return getattr(getattr(forward, "__func__", forward), _MARK, None)


def add(obj) -> None:
    """Count ``obj`` (a class or an instance) as patched."""
    (_CLASSES if isinstance(obj, type) else _INSTANCES).add(obj)


def discard(obj) -> None:
    """Stop counting ``obj`` as patched."""
    (_CLASSES if isinstance(obj, type) else _INSTANCES).discard(obj)


def wanted() -> bool:
    """Whether a class or a live instance is patched by ``cutce.transformers.patch``."""
    return bool(_CLASSES) or len(_INSTANCES) > 0
