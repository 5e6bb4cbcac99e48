"""The loss patch: ``patch(model_or_class, **loss_options)`` wraps the model's ``forward``.

Called without ``labels`` the patched forward is the original one, untouched. Called with
``labels`` it runs the original forward with ``labels=None`` through
:func:`cutce.integrations.transformers.heads.run_without_logits` (the head's logits replaced by a checked
probe; see there), then computes the loss as ``linear_cross_entropy`` of the head's hidden states
and the head's weight and bias, with the label handling of transformers' ``ForCausalLMLoss``
(labels padded with the ignore index and shifted by one, ``shift_labels``, ``ignore_index``, mean
or sum / ``num_items_in_batch``) and the config's logit transform. A MoE model's router auxiliary
loss, which the original forward computes itself, is added with the model's own
``router_aux_loss_coef``.

With labels the output is the model's own output class with ``loss`` set and ``logits=None``; as
a tuple (``return_dict=False``) it is ``output.to_tuple()``, which leaves out ``None`` entries, so
``out[0]`` is the loss and the logits are absent.

A PEFT model (``peft.PeftModel``, e.g. LoRA) is patched through the transformers model it wraps
(``get_base_model()``); its forward reaches that model's forward with the labels.

A model's first call with labels logs one INFO line on the ``"cutce"`` logger (shape, backend,
strategy: :mod:`cutce.announce`). While a model or class is patched, TRL's fused LM-head calls on
it run cutce's head too (:mod:`cutce.integrations.trl_route`).
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, TypeVar

import torch
from torch import nn

# a model instance or a model class: patch and unpatch return what they are given
_M = TypeVar("_M")

from ... import announce
from ...api import linear_cross_entropy
from ...module import LinearCrossEntropyLoss
from .. import trl_route
from .heads import UnsupportedModelError, head_apply, run_without_logits, transformers_model
from .patch_state import _MARK, ROUTE, _patch_of

__all__ = ["patch", "unpatch", "is_patched", "UnsupportedModelError"]

# The adapter derives these from the model; a user value would make the loss differ from the model's.
_ADAPTER_OWNED = ("ignore_index", "reduction", "softcap", "logit_scale", "shift", "return_lse",
                  "token_weights", "bias")


class _Patch:
    """What ``unpatch`` needs: the wrapped forward and where the patched one was installed."""

    def __init__(self, original, options, previous=None, had_own=True):
        self.original = original      # function(self, *args, **kwargs) that the patch calls
        self.options = options        # extra linear_cross_entropy keywords (impl, z_loss, ...)
        self.previous = previous      # what was in the class's / instance's __dict__ before
        self.had_own = had_own        # whether that __dict__ had a "forward" at all
        self.names = _positional_names(original)


def patch(model_or_class: _M, **loss_options: Any) -> _M:
    """Make a causal LM compute its training loss with :func:`cutce.linear_cross_entropy`.

    Args:
        model_or_class: a transformers ``*ForCausalLM`` class (all its instances, present and
            future, are patched) or an instance (only it is patched), also inside a PEFT model
            (``peft.PeftModel``) or a ``torch.compile`` module, which are returned as given.
        **loss_options: passed on to ``linear_cross_entropy``: ``impl``, ``label_smoothing``,
            ``z_loss``, ``filter_eps``, ``memory_budget``, ``chunk_bytes``. The options the
            model determines (ignore index, reduction, softcap, scale, shift) are not accepted.

    Returns:
        ``model_or_class``, so that ``model = patch(AutoModelForCausalLM.from_pretrained(...))``.

    Raises:
        UnsupportedModelError: the class is not a transformers model whose forward computes its
            loss with ``self.loss_function``. Per-call checks (head type, logit transform, MoE
            coefficient) raise it at the first call with labels.
        ValueError: already patched (class or instance).
    """
    options = _check_options(loss_options)
    given, model_or_class = model_or_class, transformers_model(model_or_class)
    if isinstance(model_or_class, type):
        cls = model_or_class
        _check_class(cls)
        if _patch_of(cls.forward) is not None:
            raise ValueError(f"{cls.__name__} (or a base class) is already patched by cutce")
        state = _Patch(cls.forward, options, cls.__dict__.get("forward"), "forward" in cls.__dict__)
        cls.forward = _make_forward(state)
        trl_route.patched(cls)
        return cls
    model = model_or_class
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: expected a transformers model or model class, got {type(model).__name__}")
    cls = type(model)
    _check_class(cls)
    if _patch_of(cls.forward) is not None:
        raise ValueError(f"{cls.__name__} is already patched by cutce as a class; this instance with it")
    previous = model.__dict__.get("forward")
    if previous is not None and _patch_of(previous) is not None:
        raise ValueError(f"this {cls.__name__} instance is already patched by cutce")
    if previous is None:
        original = cls.forward
    elif isinstance(previous, types.MethodType) and previous.__self__ is model:
        original = previous.__func__  # e.g. accelerate's wrapper, bound to this model
    else:
        raise UnsupportedModelError(f"{cls.__name__}: the instance's forward was replaced by "
                                    f"{previous!r}, which cutce cannot wrap")
    state = _Patch(original, options, previous, previous is not None)
    # A bound method (not a closure over the model): deepcopy rebinds it to the copy.
    model.forward = types.MethodType(_make_forward(state), model)
    trl_route.patched(model)
    return given


def unpatch(model_or_class: _M) -> _M:
    """Undo :func:`patch` exactly: the class's or instance's ``forward`` is what it was before.

    Raises ValueError when it is not patched, or when its forward was wrapped again after the patch
    (unwrapping then would drop that later wrapper). A PEFT model: its base model's forward.
    """
    given, model_or_class = model_or_class, transformers_model(model_or_class)
    if isinstance(model_or_class, type):
        where, what = model_or_class, model_or_class.__name__
    else:
        where, what = model_or_class, f"this {type(model_or_class).__name__} instance"
    current = vars(where).get("forward")
    state = _patch_of(current)
    if state is None:
        raise ValueError(f"{what} is not patched by cutce (or its forward was wrapped again since)")
    if state.had_own:
        setattr(where, "forward", state.previous)
    else:
        delattr(where, "forward")
    trl_route.unpatched(where)
    return given


def is_patched(model_or_class) -> bool:
    """Whether calls with labels on this class or instance (or PEFT model) use cutce's loss."""
    model_or_class = transformers_model(model_or_class)
    return _patch_of(getattr(model_or_class, "forward", None)) is not None


def _check_options(options):
    owned = sorted(set(options) & set(_ADAPTER_OWNED))
    if owned:
        raise TypeError(f"patch: option(s) {owned} are set by the adapter from the model's config")
    LinearCrossEntropyLoss(**options)  # validates names and values now, not at the first step
    return dict(options)


def _check_class(cls):
    """Static checks: a transformers model whose forward takes labels and uses loss_function."""
    from transformers import PreTrainedModel

    if not issubclass(cls, PreTrainedModel):
        raise UnsupportedModelError(f"{cls.__name__}: expected a transformers PreTrainedModel (or a "
                                    f"PEFT model wrapping one), got {cls.__module__}.{cls.__name__}")
    forward = cls.forward
    if _patch_of(forward) is not None:
        return
    try:
        params = inspect.signature(forward).parameters
        source = inspect.getsource(inspect.unwrap(forward))
    except (TypeError, ValueError, OSError) as e:
        raise UnsupportedModelError(f"{cls.__name__}: cannot inspect its forward ({e})") from e
    if "labels" not in params:
        raise UnsupportedModelError(f"{cls.__name__}.forward takes no labels: not a causal LM head")
    # Encoder-decoder style *ForCausalLM classes compute their own CrossEntropyLoss inline; the
    # adapter only reproduces transformers' ForCausalLMLoss, reached through self.loss_function.
    if "self.loss_function" not in source:
        raise UnsupportedModelError(f"{cls.__name__}.forward does not compute its loss with "
                                    "self.loss_function (ForCausalLMLoss); cutce cannot reproduce it")


def _positional_names(original):
    """Parameter names that positional arguments after self bind to (to find labels in args)."""
    names = []
    for p in list(inspect.signature(original).parameters.values())[1:]:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return tuple(names)


def _make_forward(state):
    @functools.wraps(state.original)  # keeps the signature: Trainer reads it for columns/loss kwargs
    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        if "labels" in state.names[:len(args)]:
            labels = args[state.names.index("labels")]
        if labels is None:
            return state.original(self, *args, **kwargs)
        if len(args) > len(state.names):
            raise TypeError(f"{type(self).__name__}.forward got {len(args)} positional arguments")
        both = set(state.names[:len(args)]) & set(kwargs)
        if both:
            raise TypeError(f"{type(self).__name__}.forward got multiple values for {sorted(both)}")
        kwargs.update(zip(state.names, args))
        return _forward_with_labels(self, state, labels, kwargs)

    setattr(forward, _MARK, state)
    return forward


def _forward_with_labels(model, state, labels, kwargs):
    from transformers.loss.loss_utils import ForCausalLMLoss

    name = type(model).__name__
    if model.loss_function is not ForCausalLMLoss:
        raise UnsupportedModelError(f"{name}: loss_function is {model.loss_function!r}, not "
                                    "transformers' ForCausalLMLoss")
    # The same default as transformers' can_return_tuple: the config's return_dict.
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    kwargs.update(labels=None, return_dict=True)
    call = run_without_logits(model, state.original, kwargs)
    targets = _shifted_targets(call.hidden, labels, kwargs)
    with announce.first_call(model, ROUTE, "the loss"):
        loss = head_apply(call, _causal_lm_loss, targets, kwargs.get("ignore_index", -100),
                          kwargs.get("num_items_in_batch"), call.softcap, call.scale, state.options)
    out = call.output
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        coef = getattr(model, "router_aux_loss_coef", None)
        if coef is None:
            raise UnsupportedModelError(f"{name} returns an aux_loss but has no router_aux_loss_coef")
        loss = loss + coef * aux.to(loss.device)
    # A new output of the same class, so "loss" comes first in to_tuple() as in the original.
    fields = {k: getattr(out, k) for k in out.__dataclass_fields__}
    fields.update(loss=loss, logits=None)
    out = type(out)(**fields)
    return out if return_dict else out.to_tuple()


def _shifted_targets(hidden, labels, kwargs):
    """(*, T') targets aligned with the head's hidden states, as transformers' ForCausalLMLoss."""
    targets = kwargs.get("shift_labels")
    if targets is None:
        # Shift by padding with ignore_index, as ForCausalLMLoss does: the last position of every
        # row predicts nothing, and rows stay aligned with the (possibly sliced) hidden states.
        targets = nn.functional.pad(labels, (0, 1), value=kwargs.get("ignore_index", -100))[..., 1:]
    if targets.numel() != hidden.shape[:-1].numel():
        raise ValueError(f"labels: expected {hidden.shape[:-1].numel()} positions after the shift (the "
                         f"hidden states given to the head, shape {tuple(hidden.shape)}), got "
                         f"{tuple(targets.shape)}")
    return targets.reshape(hidden.shape[:-1])


def _causal_lm_loss(hidden, weight, bias, targets, ignore_index, num_items, softcap, scale, options):
    """transformers' ForCausalLMLoss with linear_cross_entropy in place of logits + cross_entropy.

    hidden (*, T', D), weight (V, D), bias (V,) or None, targets (*, T') int; returns a 0-dim float32
    (float64 for float64 models): the mean over valid targets, or their sum / num_items.
    """
    loss = linear_cross_entropy(hidden, weight, targets.to(hidden.device), bias,
                                ignore_index=ignore_index,
                                reduction="mean" if num_items is None else "sum",
                                softcap=softcap, logit_scale=scale, **options)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return loss
