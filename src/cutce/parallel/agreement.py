"""The fingerprint of a vocabulary-parallel call, to check that every rank of the group made the
same call before any collective whose size depends on it (see :mod:`cutce.parallel.vocab`).

:func:`call_codes` encodes a call as a fixed number of int64s; the ranks all-gather them with the
layout and :func:`check` raises the same ValueError on every rank, naming the first field that
differs and each rank's value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct

import torch

from ..engine.options import IMPLS, REDUCTIONS, Options

# The call's fingerprint: what must be the same on every rank of the split, because it decides
# the size or the number of the collectives that follow (label smoothing and entropy add rows to
# the all-gather, shift and the hidden shape change N, the dtype and the grad mode decide the
# backward's all-reduce) or because the replicated loss is only one loss if every rank forms the
# same one. Every Options field is in it (a new option is checked without further code), then
# the call's other keywords and the hidden states' layout. The list is fixed, so the exchange
# that carries it has the same size on every rank whatever the options: it cannot mismatch.
_DTYPES = ("float16", "bfloat16", "float32", "float64")
# A function's own facts beyond Options and the call's common keywords: None where they do not
# apply, so that a distillation on one rank and a loss on another disagree on the teacher's
# fields instead of meeting in collectives of different sizes.
FACTS = ("impl", "targets given", "student_logit_scale", "teacher_logit_scale",
         "teacher_hidden size Dt", "teacher_hidden dtype", "teacher_hidden.requires_grad",
         "tail", "teacher_ids K")
_CHOICES = {"reduction": REDUCTIONS, "hidden dtype": _DTYPES, "torch.autocast": _DTYPES,
            "memory_budget": ("auto",), "impl": IMPLS, "teacher_hidden dtype": _DTYPES,
            "tail": ("drop", "renormalize", "bucket")}
# lse_out is return_lse as the backends see it: compared as return_lse, so that a disagreement
# names the caller's argument, not an internal field; need_stats is named return_stats likewise.
_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(Options) if f.name != "lse_out")
_CALLER_NAMES = {"need_stats": "return_stats"}
FIELDS = tuple(_CALLER_NAMES.get(f, f) for f in _OPTION_FIELDS) + (
    "shift", "return_lse", "reduce_hidden_grad", "token_weights given", "class_weight given",
    "temperature tensor given",
    "grad mode (torch.is_grad_enabled())", "hidden.requires_grad", "hidden dtype", "torch.autocast",
    "hidden size D", "tokens (hidden rows after shift)") + FACTS
_SHAPE_FIELDS = frozenset(("hidden size D", "tokens (hidden rows after shift)"))
_NONE, _BOOL, _INT, _FLOAT, _STR = range(5)
_INT64 = (-(2**63), 2**63 - 1)


def _encode(name, value) -> tuple[int, int]:
    """One field as (kind, payload) int64s: exact (floats by their bits), None distinct."""
    if value is None:
        return _NONE, 0
    if isinstance(value, bool):
        return _BOOL, int(value)
    if isinstance(value, int):
        return _INT, min(max(value, _INT64[0]), _INT64[1])
    if isinstance(value, float):  # + 0.0: -0.0 and 0.0 are the same option
        return _FLOAT, struct.unpack("<q", struct.pack("<d", value + 0.0))[0]
    if isinstance(value, str):
        choices = _CHOICES.get(name, ())
        return _STR, choices.index(value) if value in choices else -1
    raise TypeError(f"cutce: cannot fingerprint {name}={value!r}")  # a new kind of Options field


def _decode(name, kind, payload):
    if kind == _NONE:
        return None
    if kind == _BOOL:
        return bool(payload)
    if kind == _FLOAT:
        return struct.unpack("<d", struct.pack("<q", payload))[0]
    if kind == _STR:
        choices = _CHOICES.get(name, ())
        return choices[payload] if 0 <= payload < len(choices) else "<other>"
    return payload


def eager(fn):
    """``torch.compiler.disable(fn)``, built at the first call: decorating at import time would
    import torch._dynamo (and Triton with it) whenever cutce is imported, which is slow and,
    before TRITON_INTERPRET is set, switches Triton's interpreter off."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return _disabled(fn)(*args, **kwargs)

    return call


@functools.lru_cache(maxsize=None)
def _disabled(fn):
    return torch.compiler.disable(fn)


# Host-side bookkeeping, run eagerly under torch.compile (which would trace struct's bytes and
# the option floats symbolically); its all-gather is a graph break anyway (a host sync).
@eager
def call_codes(opts, shift, return_lse, reduce_hidden_grad, hidden, token_weights,
               class_weight=None, temperature=None, facts=None):
    """This rank's call as 2 * len(FIELDS) int64s (all None when ``opts`` is None). ``facts``:
    the function's own values by :data:`FACTS` name (the others None)."""
    if opts is None:
        return [0] * (2 * len(FIELDS))
    facts = facts or {}
    unknown = set(facts) - set(FACTS)
    if unknown:  # a new fact must be named in FACTS, so that every rank's list has its place
        raise TypeError(f"cutce: cannot fingerprint {sorted(unknown)}: not in agreement.FACTS")
    is_tensor = isinstance(hidden, torch.Tensor)
    dtype = str(hidden.dtype).removeprefix("torch.") if is_tensor else None
    device = hidden.device.type if is_tensor else None
    autocast = (str(torch.get_autocast_dtype(device)).removeprefix("torch.")
                if device is not None and torch.is_autocast_enabled(device) else None)
    rows = d = -1
    if is_tensor and hidden.dim() >= (2 if shift else 1):
        lead = hidden.shape[:-1]
        rows = math.prod(lead[:-1]) * (lead[-1] - 1) if shift else math.prod(lead)
        d = hidden.shape[-1]
    grad = torch.is_grad_enabled()
    values = [getattr(opts, name) for name in _OPTION_FIELDS] + [
        bool(shift), bool(return_lse), reduce_hidden_grad, token_weights is not None,
        class_weight is not None, temperature is not None, grad,
        grad and is_tensor and hidden.requires_grad, dtype, autocast, d, rows] + [
        facts.get(name) for name in FACTS]
    return [c for name, v in zip(FIELDS, values) for c in _encode(name, v)]


def check(codes):
    """Raise the same ValueError on every rank if the ranks' fingerprints (W, 2F) differ."""
    diff = []
    for i, name in enumerate(FIELDS):
        per_rank = [_decode(name, row[2 * i], row[2 * i + 1]) for row in codes]
        if any(row[2 * i:2 * i + 2] != codes[0][2 * i:2 * i + 2] for row in codes):
            diff.append((name, per_rank))
    if not diff:
        return
    name, per_rank = diff[0]
    groups = {}
    for r, v in enumerate(per_rank):
        groups.setdefault(repr(v), []).append(r)
    has = ", ".join(f"rank {rs[0]} has {v}" if len(rs) == 1 else
                    f"ranks {', '.join(map(str, rs))} have {v}" for v, rs in groups.items())
    more = f"; also on {', '.join(n for n, _ in diff[1:])}" if len(diff) > 1 else ""
    hint = ("a vocabulary-parallel call needs the same hidden states on every rank; is the "
            "weight an FSDP2-sharded parameter used outside its module's forward?"
            if name in _SHAPE_FIELDS else
            "a vocabulary-parallel call needs the same options, grad mode and inputs on every rank")
    raise ValueError(f"vocab_group ranks disagree on {name}: {has}{more} ({hint})")
