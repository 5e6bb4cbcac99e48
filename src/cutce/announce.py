"""The line that says cutce computes a model's head: one INFO record on the ``"cutce"`` logger.

A route that hands a model's head to cutce (``cutce.transformers.patch``, ``cutce.trl``) wraps the
computation in :func:`first_call`; the public function it calls describes the call as a
``Problem`` and plans it anyway, and :func:`planned` (called by ``api.compute_parts`` with that
plan) logs the line. So the backend and strategy logged are the ones the call runs with, read off
the plan it already made: no second planning, no device synchronization.

Once per model instance and route: a model trained through both routes (a patched model under
TRL's fused head, then evaluated with labels) logs once per route, and a copy of a model
(``deepcopy``, a reference model) logs for itself. Nothing is recorded while the logger is not
enabled for INFO, so the line comes with the first call after logging is switched on, e.g.
``logging.basicConfig(level=logging.INFO)``. A call traced by ``torch.compile`` logs nothing (its
plan is made again at run time, inside the compiled graph); the model's first eager call does.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import weakref

import torch

_log = logging.getLogger("cutce")
# The route's pending announcement, read by planned(); a context variable so that threads (and
# asyncio tasks) running other models do not take each other's.
_PENDING: contextvars.ContextVar = contextvars.ContextVar("cutce_announce", default=None)
# model -> the routes already announced for it; weak, so that it keeps no model alive.
_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NOTHING = contextlib.nullcontext()


@dataclasses.dataclass
class _Pending:
    model: object
    route: str
    what: str
    done: bool = False


def first_call(model, route: str, what: str):
    """A context manager: the head computation run inside it logs the line, if it is ``model``'s
    first through ``route`` since INFO was enabled. ``what`` says what the head computes.

    Cheap when there is nothing to say (a check of the logger's level, a dictionary lookup), and
    a constant under ``torch.compile``, so that it adds nothing to a compiled graph.
    """
    if torch.compiler.is_compiling() or not _log.isEnabledFor(logging.INFO):
        return _NOTHING
    if route in _SEEN.get(model, ()):
        return _NOTHING
    return _announcing(_Pending(model, route, what))


@contextlib.contextmanager
def _announcing(pending):
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)


def planned(problem, backend: str, strategy: str, vocab: int) -> None:
    """Log the pending route's line for this call (no-op when none is pending). ``problem`` is
    the call's ``Problem``, ``backend`` and ``strategy`` the planner's choices, ``vocab`` the whole
    vocabulary (``problem.v`` is this rank's slice when it is split)."""
    pending = _PENDING.get()
    if pending is None or pending.done:
        return
    pending.done = True
    _SEEN.setdefault(pending.model, set()).add(pending.route)
    split = "" if vocab == problem.v else f" ({problem.v} on this rank)"
    _log.info("cutce computes %s's LM head (%s, %s): %d tokens x D=%d x V=%d%s, %s, "
              "backend=%s, strategy=%s", type(pending.model).__name__, pending.route, pending.what,
              problem.n, problem.d, vocab, split, str(problem.dtype).removeprefix("torch."),
              backend, strategy)
