"""A causal LM's final hidden states and output head, without its logits.

One implementation for everything that replaces the head's N x V logits by a cutce function (the
loss patch, :func:`cutce.transformers.token_log_probs` and the distillation loop of docs/distillation.md):

* :func:`run_without_logits` runs the model's own ``forward`` with its ``lm_head`` *module*
  replaced, for that one call, by a stand-in module that records the hidden states it receives
  and returns a tiny *probe* (9 known values per position) instead of the logits. Everything the
  model does around the head still happens exactly as written in its own code (the decoder call
  with all its arguments, ``logits_to_keep``, router logits and their auxiliary loss, the output
  class), and what the forward did to the probe must equal the logit transform named by the
  config (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``), or the call raises
  :class:`UnsupportedModelError` -- never a silently different result.
* :func:`head_apply` then calls ``fn(hidden, weight, bias, ...)`` with the head's parameters. When
  the head is its own FSDP2 ``fully_shard`` unit it does so as one of the head's forward methods
  (``register_fsdp_forward_method``), so that FSDP2 gathers the weight for it, re-gathers it for
  its backward and reduce-scatters its gradient, as for the head's own forward.
* :func:`transformers_model` unwraps a PEFT model or a ``torch.compile`` module to the
  transformers model that the loss patch, the log-probs and the TRL hook act on.

Why a module swap and not a stand-in ``lm_head.forward``: assigning and deleting a module's
``forward`` attribute does not trace under ``torch.compile``, while replacing a submodule does, and
the probe check is a custom op (opaque to dynamo), so a compiled model has no graph break here.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

# Probe values: magnitudes from 0 to 1e4, so that a scale, a softcap (tanh saturates) or an offset
# anywhere in a realistic range changes them far beyond rounding.
_PROBE = (-1.0e4, -300.0, -7.5, -0.5, 0.0, 0.25, 3.0, 40.0, 2.0e3)
_FSDP_METHOD = "_cutce_head_apply"


class UnsupportedModelError(TypeError):
    """The model's forward does something around its head that the adapter cannot reproduce."""


@dataclasses.dataclass
class HeadCall:
    """What :func:`run_without_logits` returns.

    Attributes:
        output: the forward's own output object (a ``ModelOutput``); its ``logits`` hold the
            transformed probe, shape (*, T', 9), not logits.
        hidden: (*, T', D) the hidden states the forward gave its head (after ``logits_to_keep``),
            in the decoder's dtype.
        head: the ``nn.Linear`` output embedding (weight (V, D), bias (V,) or None).
        softcap, scale: the logit transform ``softcap * tanh(scale * z / softcap)`` that the
            forward was checked to apply (softcap None: ``scale * z``).
        check: 0-dim float32 zero produced by the probe check; :func:`head_apply` adds it to its
            result so that the check is part of a compiled graph, not dead code.
    """

    output: object
    hidden: torch.Tensor
    head: nn.Linear
    softcap: float | None
    scale: float
    check: torch.Tensor


class _StandIn(nn.Module):
    """Takes the head's place for one call: records its input, returns the probe."""

    def __init__(self, name):
        super().__init__()
        self.model_name = name
        self.captured = []

    def forward(self, hidden):
        if self.captured:
            raise UnsupportedModelError(f"{self.model_name}.forward calls its output embedding more "
                                        "than once")
        self.captured.append(hidden)
        # A real (small: 9 values per position) tensor, so in-place ops on the logits still work.
        probe = torch.tensor(_PROBE, dtype=torch.float32, device=hidden.device)
        return probe.expand(*hidden.shape[:-1], len(_PROBE)).contiguous()

    def __getattr__(self, attr):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            # e.g. a forward that reads lm_head.weight itself instead of calling the head. Still an
            # AttributeError (hasattr() must keep working), with a message that says why.
            raise AttributeError(f"{self.model_name}.forward reads lm_head.{attr} during a call "
                                 "that cutce runs without logits (the head is a stand-in then): "
                                 "such a model is not supported by cutce.transformers") from None


def output_head(model):
    """(attribute name, head): the model's output embedding, checked to be a plain ``nn.Linear``
    over ``config.vocab_size`` classes held as a direct submodule.

    Raises:
        UnsupportedModelError: no such head (quantized, adapter-wrapped, FSDP1-wrapped, ...).
    """
    name = type(model).__name__
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise UnsupportedModelError(f"{name}: the output embedding is {type(head).__name__}, not a "
                                    "plain torch.nn.Linear (quantized or adapter-wrapped heads are "
                                    "not supported)")
    if not head.weight.is_floating_point():
        raise UnsupportedModelError(f"{name}: the output embedding's weight is {head.weight.dtype}")
    if tuple(head.weight.shape) != (head.out_features, head.in_features):
        # e.g. a DeepSpeed ZeRO-3 partition, gathered only inside the head's own forward.
        raise UnsupportedModelError(f"{name}: the output embedding's weight has shape "
                                    f"{tuple(head.weight.shape)}, expected "
                                    f"{(head.out_features, head.in_features)} (partitioned?)")
    vocab = getattr(model.config, "vocab_size", None)
    if head.out_features != vocab:
        raise UnsupportedModelError(f"{name}: the output embedding has {head.out_features} classes, "
                                    f"config.vocab_size is {vocab}")
    for attr, child in model._modules.items():
        if child is head:
            return attr, head
    raise UnsupportedModelError(f"{name}: the output embedding is not a direct submodule")


def logit_transform(config):
    """(softcap, scale) that the config asks the forward to apply to the logits."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:       # Cohere multiplies
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:    # Granite divides
        scale /= float(config.logits_scaling)
    return (None if softcap is None else float(softcap)), scale


def run_without_logits(model, forward, kwargs) -> HeadCall:
    """Run ``forward(model, **kwargs)`` (the model's own forward) with the head replaced by the
    stand-in, and check the logit transform it applied.

    Args:
        model: a transformers model whose head passes :func:`output_head`.
        forward: function(model, **kwargs) -> a ``ModelOutput`` with ``logits``; the model's
            original (unpatched) forward.
        kwargs: its keyword arguments (the caller removes ``labels`` if the forward must not
            compute a loss itself).

    Raises:
        UnsupportedModelError: the forward does not call the head exactly once, or transforms the
            probe differently from what the config says.
    """
    name = type(model).__name__
    attr, head = output_head(model)
    stand_in = _StandIn(name)
    setattr(model, attr, stand_in)
    try:
        out = forward(model, **kwargs)
    finally:
        setattr(model, attr, head)
    if not stand_in.captured:
        raise UnsupportedModelError(f"{name}.forward did not call get_output_embeddings()")
    softcap, scale = logit_transform(model.config)
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise UnsupportedModelError(f"{name}.forward returned logits {type(logits).__name__}, "
                                    "expected the head's output (a float tensor)")
    check = torch.ops.cutce.check_logit_transform(logits.detach(), softcap or 0.0, scale, name)
    return HeadCall(out, stand_in.captured[0], head, softcap, scale, check)


def head_apply(call: HeadCall, fn, *args):
    """``fn(hidden, weight, bias, *args)`` with the head's parameters, plus the probe check.

    ``fn`` returns a tensor or a tuple whose first element is a tensor; the check's zero is added
    to it. With an FSDP2 head unit, ``fn`` runs between the unit's pre- and post-forward hooks.
    """
    head, hidden = call.head, call.hidden
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and isinstance(head, fsdp.FSDPModule):
        if _FSDP_METHOD not in head.__dict__:
            setattr(head, _FSDP_METHOD, _apply.__get__(head))
            fsdp.register_fsdp_forward_method(head, _FSDP_METHOD)
        result = getattr(head, _FSDP_METHOD)(fn, hidden, *args)
    else:
        result = _apply(head, fn, hidden, *args)
    first = result[0] if isinstance(result, tuple) else result
    first = first + call.check.to(first.device)
    return (first,) + result[1:] if isinstance(result, tuple) else first


def _apply(head, fn, hidden, *args):
    # Inside an FSDP2 forward method the parameters are the unsharded ones here.
    if hidden.device != head.weight.device:  # as accelerate's device hooks move the head's input
        hidden = hidden.to(head.weight.device)
    return fn(hidden, head.weight, head.bias, *args)


@torch.library.custom_op("cutce::check_logit_transform", mutates_args=())
def _check_logit_transform(logits: torch.Tensor, softcap: float, scale: float,
                           model: str) -> torch.Tensor:
    """The forward's transform of the probe must be cutce's transform for the config (softcap 0:
    none). Returns a float32 0-dim zero; raises UnsupportedModelError otherwise. A custom op so that
    torch.compile keeps it as one opaque node (its data-dependent check would break the graph)."""
    want = torch.tensor(_PROBE, dtype=torch.float64) * scale
    if softcap:
        want = softcap * torch.tanh(want / softcap)
    ok = logits.shape[-1] == len(_PROBE)
    if ok:
        tol = 8 * torch.finfo(logits.dtype).eps
        got = logits.reshape(-1, len(_PROBE)).double()
        ok = torch.allclose(got, want.to(got.device).expand_as(got), rtol=tol, atol=tol)
    if not ok:
        raise UnsupportedModelError(
            f"{model}: its forward transforms the logits differently from what cutce derives from "
            f"the config (softcap={softcap or None}, scale={scale} from final_logit_softcapping, "
            "logit_scale, logits_scaling); refusing rather than computing a different result")
    return logits.new_zeros((), dtype=torch.float32)


@_check_logit_transform.register_fake
def _(logits, softcap, scale, model):
    return logits.new_empty((), dtype=torch.float32)


def transformers_model(obj):
    """The transformers model that a PEFT model or torch.compile's module wraps; else ``obj``."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(obj, eval_frame.OptimizedModule):
        obj = obj._orig_mod  # patching it makes the compiled module retrace with the patch
    peft = sys.modules.get("peft")  # a PeftModel exists only if peft was imported
    if peft is None:
        return obj
    if isinstance(obj, type) and issubclass(obj, peft.PeftModel):
        raise UnsupportedModelError(f"{obj.__name__}: expected a PEFT model instance or a "
                                    "transformers class, got a PEFT class")
    if isinstance(obj, peft.PeftModel):
        base = obj.get_base_model()
        if base is obj or isinstance(base, peft.PeftModel):
            raise UnsupportedModelError(f"{type(obj).__name__}: get_base_model() returned "
                                        f"{type(base).__name__}, expected a transformers model")
        return base
    return obj
