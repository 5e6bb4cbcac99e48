"""Hugging Face transformers: train any ``*ForCausalLM`` with cutce's loss, by one generic patch.

``patch(model_or_class, **loss_options)`` wraps the model's ``forward``. Called without
``labels`` it is the original forward, untouched. Called with ``labels`` it runs the original
forward with ``labels=None`` while the output embedding (``get_output_embeddings()``, the
``lm_head``) is swapped, for that one call, for a stand-in that records the hidden states it
receives and returns a tiny *probe* instead of the N x V logits. Everything the model does
around the head therefore still happens exactly as written in its own code: the decoder call with
all its arguments, ``logits_to_keep``, router logits and their auxiliary loss, the output class.
The loss is then ``linear_cross_entropy`` of the recorded hidden states and the head's weight and
bias, with the label handling of transformers' ``ForCausalLMLoss`` (labels padded with the ignore
index and shifted by one, ``shift_labels``, ``ignore_index``, mean or sum / ``num_items_in_batch``)
and the logit transform named by the config (``final_logit_softcapping``, ``logit_scale``,
``logits_scaling``). The probe is how an unknown transform is caught: whatever the forward did to
it must equal what cutce will apply, or the call raises :class:`UnsupportedModelError` naming the
class -- never a silently different loss. A MoE model's router auxiliary loss, which the original
forward computes itself, is added with the model's own ``router_aux_loss_coef``.

With labels the output is the model's own output class with ``loss`` set and ``logits=None``; as
a tuple (``return_dict=False``) it is ``output.to_tuple()``, which leaves out ``None`` entries, so
``out[0]`` is the loss and the logits are absent.

transformers is imported lazily: ``import cutce`` never imports it.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
from torch import nn

from .api import LinearCrossEntropyLoss, linear_cross_entropy

__all__ = ["patch", "unpatch", "is_patched", "UnsupportedModelError"]

# The adapter derives these from the model; a user value would make the loss differ from the model's.
_ADAPTER_OWNED = ("ignore_index", "reduction", "softcap", "logit_scale", "shift", "return_lse",
                  "token_weights", "bias")
# Probe values: magnitudes from 0 to 1e4, so that a scale, a softcap (tanh saturates) or an offset
# anywhere in a realistic range changes them far beyond rounding.
_PROBE = (-1.0e4, -300.0, -7.5, -0.5, 0.0, 0.25, 3.0, 40.0, 2.0e3)
_MARK = "_cutce_patch"


class UnsupportedModelError(TypeError):
    """The model's forward does something around its loss that the adapter cannot reproduce."""


class _Patch:
    """What ``unpatch`` needs: the wrapped forward and where the patched one was installed."""

    def __init__(self, original, options, previous=None, had_own=True):
        self.original = original      # function(self, *args, **kwargs) that the patch calls
        self.options = options        # extra linear_cross_entropy keywords (impl, z_loss, ...)
        self.previous = previous      # what was in the class's / instance's __dict__ before
        self.had_own = had_own        # whether that __dict__ had a "forward" at all
        self.names = _positional_names(original)


def patch(model_or_class, **loss_options):
    """Make a causal LM compute its training loss with :func:`cutce.linear_cross_entropy`.

    Args:
        model_or_class: a transformers ``*ForCausalLM`` class (all its instances, present and
            future, are patched) or an instance (only it is patched).
        **loss_options: passed on to ``linear_cross_entropy``: ``impl``, ``label_smoothing``,
            ``z_loss``, ``filter_eps``, ``deterministic``, ``chunk_bytes``. The options the
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
    if isinstance(model_or_class, type):
        cls = model_or_class
        _check_class(cls)
        if _patch_of(cls.forward) is not None:
            raise ValueError(f"{cls.__name__} (or a base class) is already patched by cutce")
        state = _Patch(cls.forward, options, cls.__dict__.get("forward"), "forward" in cls.__dict__)
        cls.forward = _make_forward(state)
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
    return model


def unpatch(model_or_class):
    """Undo :func:`patch` exactly: the class's or instance's ``forward`` is what it was before.

    Raises ValueError when it is not patched, or when its forward was wrapped again after the patch
    (unwrapping then would drop that later wrapper).
    """
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
    return model_or_class


def is_patched(model_or_class) -> bool:
    """Whether calls with labels on this class or instance use cutce's loss."""
    return _patch_of(getattr(model_or_class, "forward", None)) is not None


def _patch_of(forward):
    return getattr(getattr(forward, "__func__", forward), _MARK, None)


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
        raise UnsupportedModelError(f"{cls.__name__} is not a transformers PreTrainedModel (for a "
                                    "PEFT model, patch model.get_base_model())")
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
    name = type(model).__name__
    head = _output_head(model)
    # The same default as transformers' can_return_tuple: the config's return_dict.
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    kwargs.update(labels=None, return_dict=True)

    captured = []
    probe = torch.tensor(_PROBE)

    def stand_in(hidden):
        if captured:
            raise UnsupportedModelError(f"{name}.forward calls its output embedding more than once")
        captured.append(hidden)
        # A real (small: 9 values per position) tensor, so in-place ops on the logits still work.
        return probe.to(hidden.device).expand(*hidden.shape[:-1], len(_PROBE)).contiguous()

    saved = head.__dict__.get("forward")
    head.forward = stand_in
    try:
        out = state.original(model, **kwargs)
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved
    if not captured:
        raise UnsupportedModelError(f"{name}.forward did not call get_output_embeddings()")
    softcap, scale = _logit_transform(model.config)
    _check_probe(name, getattr(out, "logits", None), softcap, scale)

    loss = _causal_lm_loss(captured[0], head, labels, kwargs, state.options, softcap, scale)
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


def _output_head(model):
    """The model's lm_head, checked to be a plain Linear over config.vocab_size classes."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    name = type(model).__name__
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise UnsupportedModelError(f"{name}: the output embedding is {type(head).__name__}, not a "
                                    "plain torch.nn.Linear (quantized or adapter-wrapped heads are "
                                    "not supported)")
    if not head.weight.is_floating_point():
        raise UnsupportedModelError(f"{name}: the output embedding's weight is {head.weight.dtype}")
    vocab = getattr(model.config, "vocab_size", None)
    if head.out_features != vocab:
        raise UnsupportedModelError(f"{name}: the output embedding has {head.out_features} classes, "
                                    f"config.vocab_size is {vocab}")
    if model.loss_function is not ForCausalLMLoss:
        raise UnsupportedModelError(f"{name}: loss_function is {model.loss_function!r}, not "
                                    "transformers' ForCausalLMLoss")
    return head


def _logit_transform(config):
    """(softcap, scale) that the config asks the forward to apply to the logits."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:       # Cohere multiplies
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:    # Granite divides
        scale /= float(config.logits_scaling)
    return (None if softcap is None else float(softcap)), scale


def _check_probe(name, logits, softcap, scale):
    """The forward's transform of the probe must be exactly cutce's transform for the config."""
    want = torch.tensor(_PROBE, dtype=torch.float64) * scale
    if softcap is not None:
        want = softcap * torch.tanh(want / softcap)
    ok = isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.shape[-1] == len(_PROBE)
    if ok:
        tol = 8 * torch.finfo(logits.dtype).eps
        got = logits.detach().reshape(-1, len(_PROBE)).double()
        ok = torch.allclose(got, want.to(got.device).expand_as(got), rtol=tol, atol=tol)
    if not ok:
        raise UnsupportedModelError(
            f"{name}: its forward transforms the logits differently from what cutce derives from the "
            f"config (softcap={softcap}, scale={scale} from final_logit_softcapping, logit_scale, "
            "logits_scaling); refusing rather than computing a different loss")


def _causal_lm_loss(hidden, head, labels, kwargs, options, softcap, scale):
    """transformers' ForCausalLMLoss, with linear_cross_entropy in place of logits + cross_entropy."""
    ignore_index = kwargs.get("ignore_index", -100)
    num_items = kwargs.get("num_items_in_batch")
    targets = kwargs.get("shift_labels")
    if targets is None:
        # Shift by padding with ignore_index, as ForCausalLMLoss does: the last position of every
        # row predicts nothing, and rows stay aligned with the (possibly sliced) hidden states.
        targets = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"labels: expected {h.shape[0]} positions after the shift (the hidden states "
                         f"given to the head, shape {tuple(hidden.shape)}), got {tuple(targets.shape)}")
    loss = linear_cross_entropy(h, head.weight, t, head.bias, ignore_index=ignore_index,
                                reduction="mean" if num_items is None else "sum",
                                softcap=softcap, logit_scale=scale, **options)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return loss
