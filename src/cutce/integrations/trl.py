"""TRL: every LM-head quantity of TRL's trainers computed by cutce, by one call before the trainer.

``patch()`` replaces TRL's LM-head hook, ``trl.trainer.utils.add_fused_lm_head``, with
:func:`add_fused_lm_head` below, which honours the same contract with
:func:`cutce.linear_log_probs`; ``unpatch()`` puts TRL's back; ``is_patched()`` says which is bound.

Why this hook
-------------
Since TRL 1.15 the SFT, DPO, GRPO, RLOO and KTO trainers (and the experimental async GRPO) ask
one function for everything they read from the head: ``add_fused_lm_head(model, temperature,
cast_lm_head_to_fp32, outputs)`` rebinds ``model.forward`` so that a call with
``fused_lm_head=True`` returns a ``FusedCausalLMOutput`` (per-token log-probs, entropy, metrics,
a label mask and the loss) instead of logits. Replacing that one function covers every trainer,
its reference and old-policy models and every loss type they build on top (NLL, DFT, DPO and its
weightings, GRPO's entropy bonus and masks), without touching their loss code, which changes from
release to release, while calls without the flag (generation, label smoothing, evaluation
metrics that need logits) keep the model's original forward. The alternatives cover less or hold
on to more private surface: cutce.transformers.patch(model) only replaces the loss, not the
per-token outputs that the RL and preference trainers need; patching each trainer's
log-prob method means one private method per trainer and release; replacing TRL's kernel
(``ChunkedLogProbFunction``) keeps TRL's head code around it, which reads the logit transform
from config attribute names and, off Triton devices, projects every position.

How a fused call runs
---------------------
The model's own forward runs with its ``lm_head`` swapped for cutce's probe
(:func:`cutce.integrations.transformers.heads.run_without_logits`): the decoder call with every
keyword the trainer passed (``attention_mask``, packed ``position_ids``, flash-attention varlen
kwargs, multimodal inputs), PEFT adapters inside the model, router logits and the model's MoE
auxiliary loss are the model's own code, and the logit transform the forward applies (softcap,
scale) is checked against what cutce computes, or the call raises. The head's hidden states and
parameters then go to ``linear_log_probs`` (``return_stats=True`` when a metric is asked for) with
the labels shifted by one (or ``shift_labels`` as given), ``ignore_index=-100`` and the hook's
temperature; no (batch, seq, vocab) tensor is created, forward or backward.

Where it is bound
-----------------
Trainer modules import the function by name, so ``patch()`` rebinds it in ``trl.trainer.utils``
and in every loaded ``trl.*`` module holding TRL's function (found by identity, so new modules
are covered without a list); modules imported later take it from ``trl.trainer.utils``. Call
``patch()`` before the trainer is built: a model hooked earlier keeps TRL's head, and
``unpatch()`` does not unhook models already hooked by cutce's.

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
labels. A TRL whose hook does not have the signature and output class read here raises
:class:`UnsupportedTRLError`. TRL is imported lazily: ``import cutce`` does not import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
import sys
import types
import warnings

import torch

from ..engine.options import IMPLS
from ..log_probs import linear_log_probs
from ..validate import _fail, make_options
from .transformers.heads import UnsupportedModelError, head_apply, output_head, run_without_logits
from .transformers.patching import _transformers_model

__all__ = ["patch", "unpatch", "is_patched", "add_fused_lm_head", "UnsupportedTRLError",
           "UnsupportedModelError", "SUPPORTED"]

SUPPORTED = "TRL >= 1.15, < 2 (tested on 1.16.0)"
_MIN, _BELOW = (1, 15), (2, 0)
_NAME = "add_fused_lm_head"
# The hook's parameters with their defaults, and the output dataclass's fields, as of TRL 1.15-1.16.
_SIGNATURE = (("model", inspect.Parameter.empty), ("temperature", 1.0),
              ("cast_lm_head_to_fp32", False), ("outputs", ("log_probs",)))
_FIELDS = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1",
           "label_mask", "aux_loss")
# Per-token outputs, in the order linear_log_probs' metrics are unpacked below.
_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_METRICS = ("log_sum_sq_probs", "mean_logits", "is_top1")
_IGNORE = -100
_MARK = "_cutce_trl_hook"


class UnsupportedTRLError(RuntimeError):
    """The installed TRL has no LM-head hook of the form cutce replaces."""


@dataclasses.dataclass(frozen=True)
class _Hook:
    """One add_fused_lm_head call's settings (plus patch()'s options)."""

    temperature: float
    fp32: bool
    outputs: frozenset
    impl: str
    memory_budget: object


@dataclasses.dataclass
class _State:
    original: object          # TRL's add_fused_lm_head
    output_class: type        # TRL's FusedCausalLMOutput
    replacement: object       # the function bound in TRL's modules while patched
    impl: str
    memory_budget: object


_STATE: _State | None = None


def patch(*, impl: str = "auto", memory_budget: float | str | None = None) -> None:
    """Make TRL's trainers compute their LM-head outputs with cutce. Call it before building the
    trainer.

    Args:
        impl, memory_budget: passed to :func:`cutce.linear_log_probs` on every fused call.

    Raises:
        UnsupportedTRLError: TRL is not installed, or its ``add_fused_lm_head`` /
            ``FusedCausalLMOutput`` is missing or differs from the supported contract.
        ValueError: already patched, or an invalid option.
    """
    global _STATE
    if impl not in IMPLS:
        _fail("impl", f"one of {IMPLS}", repr(impl))
    make_options(torch.float32, reduction="none", memory_budget=memory_budget)  # validates it
    utils = _trl_utils()
    current = getattr(utils, _NAME, None)
    if _STATE is not None or getattr(current, _MARK, False):
        raise ValueError("TRL is already patched by cutce (cutce.trl.unpatch() first)")
    original, output_class = _check_trl(utils)
    state = _State(original, output_class, None, impl, memory_budget)
    state.replacement = _make_replacement(state)
    _rebind(original, state.replacement)
    _STATE = state


def unpatch() -> None:
    """Bind TRL's own ``add_fused_lm_head`` again wherever :func:`patch` bound cutce's. Models
    already hooked keep the head they were given.

    Raises ValueError when TRL is not patched.
    """
    global _STATE
    if _STATE is None:
        raise ValueError("TRL is not patched by cutce")
    _rebind(_STATE.replacement, _STATE.original)
    _STATE = None


def is_patched() -> bool:
    """Whether ``trl.trainer.utils.add_fused_lm_head`` is cutce's (does not import TRL)."""
    utils = sys.modules.get("trl.trainer.utils")
    return _STATE is not None and utils is not None and getattr(utils, _NAME, None) is _STATE.replacement


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, impl: str = "auto",
                      memory_budget: float | str | None = None) -> None:
    """cutce's version of TRL's ``add_fused_lm_head``: rebind ``model.forward`` so that
    ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput``
    computed by :func:`cutce.linear_log_probs`; calls without the flag run the original forward.

    Usable without :func:`patch` (it checks the installed TRL the same way). The fused call's
    contract is TRL's: per-token fields of shape (B, T - 1), or (B, T) with ``shift_labels``, 0
    where the label is -100, ``None`` for fields not in ``outputs`` (``log_probs`` always);
    ``label_mask`` and ``loss = -sum(log_probs) / num_items_in_batch`` (or / max(valid count, 1))
    always, plus ``router_aux_loss_coef * aux_loss`` when the model returns router logits.

    Args:
        model: a transformers causal LM with a plain ``nn.Linear`` head (or a PEFT model whose
            base model has one).
        temperature: > 0, divides the logits (after the model's softcap / scale).
        cast_lm_head_to_fp32: compute the head in float32, outside autocast.
        outputs: among "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1".
        impl, memory_budget: passed to :func:`cutce.linear_log_probs`.
    """
    state = _STATE
    if state is None:
        original, output_class = _check_trl(_trl_utils())
        state = _State(original, output_class, None, "auto", None)
    _hook(state, model, temperature, cast_lm_head_to_fp32, outputs, impl, memory_budget)


# --- TRL's side -------------------------------------------------------------------------------


def _trl_utils():
    try:
        import trl
        from trl.trainer import utils
    except ImportError as e:
        raise UnsupportedTRLError(f"cutce.trl needs TRL installed ({SUPPORTED}): {e}") from e
    version = _version_tuple(getattr(trl, "__version__", "0"))
    if version < _MIN:
        raise UnsupportedTRLError(f"TRL {trl.__version__} is not supported by cutce.trl: it needs "
                                  f"{SUPPORTED}, where every trainer asks {_NAME} for the LM head")
    if version >= _BELOW:
        warnings.warn(f"TRL {trl.__version__} is newer than cutce.trl supports ({SUPPORTED}); its "
                      f"{_NAME} has the same signature and output class, so cutce replaces it",
                      stacklevel=3)
    return utils


def _version_tuple(text):
    """(major, minor) of a version string; (0, 0) when it has none."""
    match = re.match(r"\s*(\d+)\.(\d+)", str(text))
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _check_trl(utils):
    """(TRL's add_fused_lm_head, FusedCausalLMOutput), checked to be the supported contract."""
    original = getattr(utils, _NAME, None)
    if getattr(original, _MARK, False) and _STATE is not None:
        original = _STATE.original
    where = "trl.trainer.utils"
    if original is None or not callable(original):
        raise UnsupportedTRLError(f"{where} has no {_NAME}: cutce.trl supports {SUPPORTED}")
    try:
        params = inspect.signature(original).parameters.values()
    except (TypeError, ValueError) as e:
        raise UnsupportedTRLError(f"cannot read {where}.{_NAME}'s signature ({e}); cutce.trl "
                                  f"supports {SUPPORTED}") from e
    got = tuple((p.name, p.default) for p in params)
    if got != _SIGNATURE:
        raise UnsupportedTRLError(f"{where}.{_NAME} has parameters {got}, expected {_SIGNATURE}: "
                                  f"cutce.trl supports {SUPPORTED}")
    output_class = getattr(utils, "FusedCausalLMOutput", None)
    fields = (tuple(f.name for f in dataclasses.fields(output_class))
              if isinstance(output_class, type) and dataclasses.is_dataclass(output_class) else None)
    if fields != _FIELDS:
        raise UnsupportedTRLError(f"{where}.FusedCausalLMOutput has fields {fields}, expected "
                                  f"{_FIELDS}: cutce.trl supports {SUPPORTED}")
    return original, output_class


def _trl_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "trl" or name.startswith("trl."))]


def _rebind(old, new):
    """Set ``add_fused_lm_head`` to ``new`` in every loaded trl module where it is ``old``."""
    for module in _trl_modules():
        if vars(module).get(_NAME) is old:
            setattr(module, _NAME, new)


def _make_replacement(state):
    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        _hook(state, model, temperature, cast_lm_head_to_fp32, outputs, state.impl,
              state.memory_budget)

    add_fused_lm_head.__doc__ = ("cutce's replacement of TRL's add_fused_lm_head (cutce.trl.patch()); "
                                 "see cutce.integrations.trl.add_fused_lm_head.")
    add_fused_lm_head.__module__ = __name__
    setattr(add_fused_lm_head, _MARK, True)
    return add_fused_lm_head


# --- the hook ---------------------------------------------------------------------------------


def _hook(state, model, temperature, fp32, outputs, impl, memory_budget):
    make_options(torch.float32, reduction="none", temperature=temperature,
                 memory_budget=memory_budget)  # validates them
    if impl not in IMPLS:
        _fail("impl", f"one of {IMPLS}", repr(impl))
    if not isinstance(fp32, bool):
        _fail("cast_lm_head_to_fp32", "a bool", repr(fp32))
    if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs):
        _fail("outputs", f"a tuple of names among {_OUTPUTS}", repr(outputs))
    unknown = sorted(set(outputs) - set(_OUTPUTS))
    if unknown:
        _fail("outputs", f"names among {_OUTPUTS} (what TRL's FusedCausalLMOutput holds)", unknown)
    from transformers import PreTrainedModel

    base = _transformers_model(model)
    if not isinstance(base, PreTrainedModel):
        raise UnsupportedModelError(f"{_NAME}: expected a transformers PreTrainedModel (or a PEFT "
                                    f"model wrapping one), got {type(base).__name__}")
    output_head(base)  # a head cutce can use, checked now rather than at the first step
    hook = _Hook(float(temperature), fp32, frozenset(outputs) | {"log_probs"}, impl, memory_budget)
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
        return _fused_call(self, state.output_class, hook, call_original, args, kwargs, labels,
                           shift_labels, num_items_in_batch)

    setattr(forward, _MARK, hook)
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
    base = _transformers_model(model)
    name = type(base).__name__
    targets = labels if shift_labels is None else shift_labels
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        _fail("labels" if shift_labels is None else "shift_labels",
              "a (batch, seq) tensor in a call with fused_lm_head=True",
              type(targets).__name__ if not isinstance(targets, torch.Tensor) else tuple(targets.shape))
    keep = kwargs.pop("logits_to_keep", None)
    if keep not in (None, 0):
        _fail("logits_to_keep", "None or 0 with fused_lm_head=True (every labelled position is "
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
    fields = dict(zip(_OUTPUTS, per_token))
    fields = {k: (v if k in hook.outputs else None) for k, v in fields.items()}
    return output_class(loss=loss, label_mask=mask, aux_loss=aux_loss, **fields)


def _head(hidden, weight, bias, targets, shift, softcap, scale, hook):
    """The per-token outputs in _OUTPUTS order (None where not computed)."""
    _check_dtensor_head(weight, bias)
    targets = targets.to(hidden.device)
    ctx = contextlib.nullcontext()
    if hook.fp32:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
        ctx = torch.autocast(hidden.device.type, enabled=False)
    kw = dict(temperature=hook.temperature, softcap=softcap, logit_scale=scale, shift=shift,
              ignore_index=_IGNORE, impl=hook.impl, memory_budget=hook.memory_budget)
    with ctx:
        if hook.outputs & set(_METRICS):
            s = linear_log_probs(hidden, weight, targets, bias, return_stats=True, **kw)
            return s.log_probs, s.entropy, s.log_sum_sq_probs, s.mean_logits, s.is_top1
        if "entropy" in hook.outputs:
            return (*linear_log_probs(hidden, weight, targets, bias, return_entropy=True, **kw),
                    None, None, None)
        return linear_log_probs(hidden, weight, targets, bias, **kw), None, None, None, None


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
