"""The forward that cutce's ``add_fused_lm_head`` (:mod:`cutce.integrations.trl`) binds on a
model: TRL's fused-LM-head contract computed by :func:`cutce.linear_log_probs`.

How a fused call runs
---------------------
The model's own forward runs with its ``lm_head`` swapped for cutce's probe
(:func:`cutce.integrations.transformers.heads.run_without_logits`): the decoder call with every
keyword the trainer passed (``attention_mask``, packed ``position_ids``, flash-attention varlen
kwargs, multimodal inputs), PEFT adapters inside the model, router logits and the model's MoE
auxiliary loss are the model's own code, and the logit transform the forward applies (softcap,
scale) is checked against what cutce computes, or the call raises. The head's hidden states and
parameters then go to ``linear_log_probs`` (``return_stats=True`` when a metric is asked for) with
the labels shifted by one (or ``shift_labels`` as given) and the hook's temperature, for the
labelled positions only (label != -100, as TRL's own head on the GPU); the outputs are 0 at the
others. No (batch, seq, vocab) tensor is created, forward or backward. A hooked model's first
fused call logs one INFO line on the ``"cutce"`` logger (:mod:`cutce.announce`). A forward bound
with a sampler's truncation (:mod:`cutce.integrations.trl_sampler`) computes its log-probs and
entropy with :func:`cutce.truncated_log_probs.sampled_log_probs` instead.

Distributed heads
-----------------
FSDP2 (``fully_shard``), the head in the root unit or in its own, with or without a PEFT adapter
on the backbone: inside the model's forward the root unit's parameters are gathered, so the head
cutce reads is the unsharded weight; a head unit of its own gathers its weight for cutce's
computation, re-gathers it in backward and reduce-scatters its gradient, as for its own forward
(:func:`cutce.integrations.transformers.heads.head_apply`). Tensor parallel: a head weight that is
a DTensor sharded by vocabulary (``Shard(0)`` on one mesh dimension, as ``ColwiseParallel`` on
``lm_head`` makes it; its input/output hooks do not run, cutce's probe takes the head's place) is
passed as it is to ``linear_log_probs``, which computes the head vocabulary-parallel over that
mesh dimension's group (no ``vocab_group``) and returns its gradient as a DTensor of the same
layout; a ``Replicate`` DTensor acts as the full weight. The hidden states must then be the same
on every rank of that group: cutce compares a fingerprint of them across the group and raises
``ValueError`` otherwise (for example a data-parallel batch that differs per rank).

What raises instead of computing something else (``UnsupportedModelError`` / ``ValueError``): an
``outputs`` name TRL's contract does not have, ``logits_to_keep`` in a fused call (TRL's hook
scores every position), a head that is not a plain ``nn.Linear`` (LoRA on ``lm_head``, where TRL's
head drops the adapter's share of the logits; quantized heads), a partitioned (ZeRO-3) weight, a
DTensor weight with another layout (``RowwiseParallel``'s ``Shard(1)``, several ``Shard(0)``
mesh dimensions), hidden states that differ across a vocabulary-sharded head's ranks, a forward
that transforms the logits differently from its config, and hidden states not aligned with the
labels.

The patch's options under TRL's fused head
------------------------------------------
TRL's trainers build their losses from the hook's per-token log-probs, not from the model's loss.
``impl`` and ``memory_budget`` carry over. ``filter_eps`` and ``chunk_bytes`` tune the loss's
speed and memory only; the fused head has no counterpart, computes the exact values without them
and says so in a warning. Options that change the loss (``label_smoothing``, ``z_loss``,
``class_weight``) or the head (``vocab_group``, ``vocab_start``, ``reduce_hidden_grad``) have no
place in per-token log-probs: hooking such a model raises ``ValueError``
(:func:`fused_options`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
import types
import warnings

import torch

from .. import announce
from ..log_probs import linear_log_probs
from ..truncated_log_probs import sampled_log_probs
from ..validate import check_impl, check_options, fail
from .transformers.heads import (UnsupportedModelError, head_apply, output_head, run_without_logits,
                                 transformers_model)

_NAME = "add_fused_lm_head"
# Per-token outputs, in the order linear_log_probs' metrics are unpacked below.
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_METRICS = ("log_sum_sq_probs", "mean_logits", "is_top1")
_IGNORE = -100
# An attribute of cutce's hook and of the forwards it binds: patch() refuses to patch over its own
# hook, and a forward carries the settings it was bound with.
MARK = "_cutce_trl_hook"
# The options of cutce.transformers.patch that the fused head takes over, and those it drops.
CARRIED = ("impl", "memory_budget")
TUNING = ("filter_eps", "chunk_bytes")


@dataclasses.dataclass(frozen=True)
class _Hook:
    """One add_fused_lm_head call's settings (plus patch()'s options)."""

    temperature: float
    fp32: bool
    outputs: frozenset
    impl: str
    memory_budget: object
    route: str  # which cutce entry point hooked the model, for the first call's log line
    trunc: object = None  # the sampler's Truncation, or None: the full softmax


def bind(output_class, model, temperature, fp32, outputs, impl, memory_budget, route,
         trunc=None):
    """Rebind ``model.forward`` to the fused forward (add_fused_lm_head's work, its arguments
    validated here); ``output_class`` is TRL's FusedCausalLMOutput, ``route`` names the cutce
    entry point in the first call's log line, ``trunc`` is the sampler's truncation or None."""
    check_options(reduction="none", temperature=temperature, memory_budget=memory_budget)
    check_impl(impl)
    if not isinstance(fp32, bool):
        fail("cast_lm_head_to_fp32", "a bool", repr(fp32))
    if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs):
        fail("outputs", f"a tuple of names among {OUTPUTS}", repr(outputs))
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        fail("outputs", f"names among {OUTPUTS} (what TRL's FusedCausalLMOutput holds)", unknown)
    if trunc is not None:
        metrics = sorted(set(outputs) & set(_METRICS))
        if metrics:
            fail("outputs", "log_probs and entropy with a sampler's truncation (the metrics "
                 "describe the full softmax)", metrics)
        if impl == "triton":
            fail("impl", "'auto' or 'torch' with a sampler's truncation (the truncated log-probs "
                 "run on the torch path)", repr(impl))
    from transformers import PreTrainedModel

    base = transformers_model(model)
    if not isinstance(base, PreTrainedModel):
        raise UnsupportedModelError(f"{_NAME}: expected a transformers PreTrainedModel (or a PEFT "
                                    f"model wrapping one), got {type(base).__name__}")
    output_head(base)  # a head cutce can use, checked now rather than at the first step
    hook = _Hook(float(temperature), fp32, frozenset(outputs) | {"log_probs"}, impl, memory_budget,
                 route, trunc)
    call_original = _original_forward(model)

    @functools.wraps(type(model).forward)  # the original signature: generate() validates against it
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return call_original(self, *args, **kwargs)
        return _fused_call(self, output_class, hook, call_original, args, kwargs, labels,
                           shift_labels, num_items_in_batch)

    setattr(forward, MARK, hook)
    # A method bound to the model (not a closure over it): deepcopy rebinds it to the copy.
    model.forward = types.MethodType(forward, model)


def _original_forward(model):
    """function(self, *args, **kwargs) running the forward the model has now."""
    previous = vars(model).get("forward")
    if previous is None:
        cls_forward = type(model).forward
        return lambda self, *args, **kwargs: cls_forward(self, *args, **kwargs)
    if isinstance(previous, types.MethodType) and previous.__self__ is model:
        func = previous.__func__  # e.g. accelerate's or an earlier hook's wrapper
        return lambda self, *args, **kwargs: func(self, *args, **kwargs)
    return lambda self, *args, **kwargs: previous(*args, **kwargs)


def _fused_call(model, output_class, hook, call_original, args, kwargs, labels, shift_labels,
                num_items):
    base = transformers_model(model)
    name = type(base).__name__
    targets = labels if shift_labels is None else shift_labels
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        fail("labels" if shift_labels is None else "shift_labels",
             "a (batch, seq) tensor in a call with fused_lm_head=True",
             type(targets).__name__ if not isinstance(targets, torch.Tensor) else tuple(targets.shape))
    keep = kwargs.pop("logits_to_keep", None)
    if keep not in (None, 0):
        fail("logits_to_keep", "None or 0 with fused_lm_head=True (every labelled position is "
             "scored; mask the others with -100)", repr(keep))
    kwargs.pop("return_dict", None)
    text_config = base.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)  # as the model's own forward does
    kwargs.update(labels=None, use_cache=False, return_dict=True)
    call = run_without_logits(base, lambda _base, **kw: call_original(model, *args, **kw), kwargs)
    hidden = call.hidden
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(targets.shape):
        raise UnsupportedModelError(f"{name}: its forward gave the head hidden states of shape "
                                    f"{tuple(hidden.shape)}, not aligned with the labels "
                                    f"{tuple(targets.shape)}")
    shift = shift_labels is None
    what = "TRL's fused LM head: " + ", ".join(o for o in OUTPUTS if o in hook.outputs)
    with announce.first_call(base, hook.route, what):
        per_token = head_apply(call, _head, targets, shift, call.softcap, call.scale, hook)
    log_probs = per_token[0]
    mask = (targets[:, 1:] if shift else targets).to(log_probs.device) != _IGNORE
    denom = mask.sum().clamp(min=1) if num_items is None else num_items
    if isinstance(denom, torch.Tensor):
        denom = denom.to(log_probs.device)
    # log_probs comes out of the head's autograd graph also when every label is masked, so an
    # all-masked batch gives a zero that backward() accepts.
    loss = -log_probs.sum() / denom
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = getattr(call.output, "aux_loss", None)
        if aux_loss is None:
            raise UnsupportedModelError(f"{name}: called with output_router_logits=True, its forward "
                                        "returned no aux_loss")
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss.to(loss.device)
    fields = dict(zip(OUTPUTS, per_token))
    fields = {k: (v if k in hook.outputs else None) for k, v in fields.items()}
    return output_class(loss=loss, label_mask=mask, aux_loss=aux_loss, **fields)


def _head(hidden, weight, bias, targets, shift, softcap, scale, hook):
    """The per-token outputs in OUTPUTS order (None where not computed)."""
    _check_dtensor_head(weight, bias)
    targets = targets.to(hidden.device)
    if shift:
        hidden, targets = hidden[:, :-1], targets[:, 1:]
    # Only labelled positions go through the head, as in TRL's own: a DPO or GRPO batch's prompts
    # and padding are about a quarter of its positions, and the head's products are the largest
    # of the step at these vocabularies. The outputs are scattered back (0 elsewhere), connected
    # to the graph also when no position is labelled.
    mask = targets != _IGNORE
    hidden, targets = hidden[mask], targets[mask]
    ctx = contextlib.nullcontext()
    if hook.fp32:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
        ctx = torch.autocast(hidden.device.type, enabled=False)
    kw = dict(temperature=hook.temperature, softcap=softcap, logit_scale=scale,
              ignore_index=_IGNORE, impl=hook.impl, memory_budget=hook.memory_budget)
    with ctx:
        if hook.trunc is not None:
            got = sampled_log_probs(hidden, weight, targets, bias, **hook.trunc._asdict(),
                                    return_entropy="entropy" in hook.outputs, **kw)
            out = (*(got if isinstance(got, tuple) else (got, None)), None, None, None)
        elif hook.outputs & set(_METRICS):
            s = linear_log_probs(hidden, weight, targets, bias, return_stats=True, **kw)
            out = (s.log_probs, s.entropy, s.log_sum_sq_probs, s.mean_logits, s.is_top1)
        elif "entropy" in hook.outputs:
            out = (*linear_log_probs(hidden, weight, targets, bias, return_entropy=True, **kw),
                   None, None, None)
        else:
            out = (linear_log_probs(hidden, weight, targets, bias, **kw), None, None, None, None)
    return tuple(None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in out)


def _check_dtensor_head(weight, bias):
    """A DTensor head weight must be one that linear_log_probs computes vocabulary-parallel (Shard(0)
    on one mesh dimension: tensor parallel ColwiseParallel) or as a plain tensor (Replicate)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None or not isinstance(weight, dtensor.DTensor):
        return
    placements = tuple(weight.placements)
    shard0 = [p for p in placements if type(p) is dtensor.Shard and p.dim == 0]
    if len(shard0) > 1 or any(not (p in shard0 or isinstance(p, dtensor.Replicate))
                              for p in placements):
        raise UnsupportedModelError(
            f"the LM head's weight is a DTensor with placements {placements}: cutce.trl computes a "
            "head sharded by vocabulary (Shard(0) on one mesh dimension, as ColwiseParallel makes "
            "it) or replicated, not others (RowwiseParallel's Shard(1), or Shard(0) on several "
            "mesh dimensions)")
    if bias is not None and isinstance(bias, dtensor.DTensor) and tuple(bias.placements) != placements:
        raise UnsupportedModelError(f"the LM head's bias has placements {tuple(bias.placements)}, "
                                    f"its weight {placements}")


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
