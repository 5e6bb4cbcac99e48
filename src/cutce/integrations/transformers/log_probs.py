"""Per-token log-probabilities (and entropy) of a causal LM's own tokens, without its logits.

What RL and preference loops (GRPO, PPO, DPO, KTO, ...) compute from ``model(...).logits``, here
from the head's hidden states and weight by :func:`cutce.linear_log_probs`: the model runs through
:func:`cutce.integrations.transformers.heads.run_without_logits` (its own forward, the head replaced by the
checked probe), so everything around the head, the logit transform included, is the model's own
code or is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ...log_probs import linear_log_probs
from ...validate import check_options, fail
from .heads import UnsupportedModelError, head_apply, run_without_logits, transformers_model

__all__ = ["token_log_probs"]

# Keywords whose meaning token_log_probs fixes itself: the targets are input_ids shifted by one.
_REFUSED_KWARGS = ("labels", "shift_labels", "inputs_embeds", "num_items_in_batch")


def token_log_probs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
    logits_to_keep: int | None = None, temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
    **model_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every next token of ``input_ids`` under ``model`` (and the entropy),
    without the (B, T, V) logits.

    Args:
        model: a transformers causal LM (``*ForCausalLM``) with a plain ``nn.Linear`` head, also a
            PEFT model wrapping one (e.g. LoRA; the adapters take part as in ``model(...)``).
        input_ids: (B, T) int64/int32 token ids, T >= 2: the sequences to score.
        attention_mask: None or (B, T), passed to the model. Padded positions are scored too (as
            in the expression below); mask them in the loss.
        logits_to_keep: None or 0 (all T - 1 positions), or k in [1, T - 1]: only the last k
            positions, scoring ``input_ids[:, -k:]`` (e.g. the completion after a prompt). The
            decoder still runs on all T positions; the head only on k.
        temperature: > 0, divides the model's logits (after its softcap / scale). A float, or
            a float tensor (not requiring grad) for rollouts sampled at mixed temperatures:
            (B,), one per sequence, or (B, T) like input_ids, where ``temperature[:, t]`` is
            the one token t was sampled at (so position t - 1's logits are divided by it, as
            ``input_ids[:, t]`` is scored there; column 0 is not read). Values must be finite
            and > 0 (those at positions ``linear_log_probs`` ignores are not read).
        return_entropy: also return the entropy of each position's next-token distribution.
        top_k, top_p, min_p: the sampler's truncation, as for :func:`cutce.linear_log_probs`:
            log-probs and entropy of the truncated, renormalised distribution (after
            ``temperature``), -inf for a token outside its kept set (see docs/rl.md).
        **model_kwargs: passed to the model's forward (position_ids, use_cache, ...); not
            ``labels``, ``shift_labels``, ``inputs_embeds`` or ``num_items_in_batch``.

    Returns:
        logp, or (logp, entropy): (B, T - 1), or (B, k) with ``logits_to_keep=k``; float32
        (float64 for a float64 model), differentiable w.r.t. every trainable parameter of the
        model through either output. Equal, up to rounding, to::

            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           **model_kwargs).logits[:, :-1] / temperature
            # a (B,) tensor: / temperature[:, None, None]; (B, T): / temperature[:, 1:, None]
            targets = input_ids[:, 1:]
            if logits_to_keep:
                logits, targets = logits[:, -logits_to_keep:], targets[:, -logits_to_keep:]
            lsm = logits.float().log_softmax(-1)
            logp = lsm.gather(-1, targets[..., None])[..., 0]
            entropy = -(lsm.exp() * lsm).sum(-1)

        with the model's own logit transform (``final_logit_softcapping``, ``logit_scale``,
        ``logits_scaling``) included; for bf16/fp16 models cutce accumulates in float32 where the
        expression rounds the logits to the model's dtype first.

    Raises:
        cutce.transformers.UnsupportedModelError: as for :func:`cutce.transformers.patch`: not a
            transformers model, a head that is not a plain ``nn.Linear`` (quantized, LoRA on the
            head), a forward that transforms the logits differently from its config, or one that
            gives its head hidden states not aligned with ``input_ids`` (e.g. PEFT prompt tuning).
        ValueError: invalid arguments ("<what>: expected X, got Y").
    """
    shape = _check_args(input_ids, attention_mask, logits_to_keep, temperature, return_entropy,
                        model_kwargs)
    check_options(top_k=top_k, top_p=top_p, min_p=min_p)  # before the model runs
    base = transformers_model(model)
    from transformers import PreTrainedModel

    if not isinstance(base, PreTrainedModel):
        raise UnsupportedModelError(f"token_log_probs: expected a transformers PreTrainedModel (or a "
                                    f"PEFT model wrapping one), got {type(base).__name__}")
    kwargs = dict(model_kwargs, input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    # The model object as given (PEFT wrapper, hooks), called as the reference calls it; only its
    # head is swapped, on the transformers model inside.
    call = run_without_logits(base, lambda _base, **kw: model(**kw), kwargs)
    hidden = call.hidden
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != shape:
        raise UnsupportedModelError(f"{type(base).__name__}: its forward gave the head hidden states of "
                                    f"shape {tuple(hidden.shape)}, expected {shape + (hidden.shape[-1],)} "
                                    "(one per input position)")
    tokens = input_ids
    if isinstance(temperature, torch.Tensor) and temperature.dim() == 1:
        temperature = temperature[:, None].expand(shape)  # per sequence: each of its tokens
    if logits_to_keep:
        # Position t's hidden state scores token t + 1: the last k scores need the last k + 1
        # states, of which linear_log_probs' shift drops the final one.
        call = dataclasses.replace(call, hidden=hidden[:, -(logits_to_keep + 1):])
        tokens = input_ids[:, -(logits_to_keep + 1):]
        if isinstance(temperature, torch.Tensor):
            temperature = temperature[:, -(logits_to_keep + 1):]
    return head_apply(call, _head_log_probs, tokens, call.softcap, call.scale, temperature,
                      return_entropy, dict(top_k=top_k, top_p=top_p, min_p=min_p))


def _head_log_probs(hidden, weight, bias, tokens, softcap, scale, temperature, return_entropy,
                    truncation):
    """hidden (B, T', D), weight (V, D), bias (V,) or None, tokens (B, T'): linear_log_probs with
    shift=True, i.e. (B, T' - 1) log-probs of tokens[:, 1:] (and entropies)."""
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(hidden.device)
    return linear_log_probs(hidden, weight, tokens.to(hidden.device), bias, temperature=temperature,
                            softcap=softcap, logit_scale=scale, shift=True,
                            return_entropy=return_entropy, **truncation)


def _check_args(input_ids, attention_mask, logits_to_keep, temperature, return_entropy, model_kwargs):
    """Validate before running the model; returns (B, T)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        fail("input_ids", "an int64 or int32 tensor",
             getattr(input_ids, "dtype", type(input_ids).__name__))
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        fail("input_ids", "shape (B, T) with T >= 2", tuple(input_ids.shape))
    shape = tuple(input_ids.shape)
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != shape):
        fail("attention_mask", f"None or a tensor of input_ids' shape {shape}",
             tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor)
             else type(attention_mask).__name__)
    if logits_to_keep is not None and (isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int)
                                       or not 0 <= logits_to_keep <= shape[1] - 1):
        fail("logits_to_keep", f"None or an int in [0, {shape[1] - 1}] (T - 1 scored positions)",
             repr(logits_to_keep))
    if not isinstance(return_entropy, bool):
        fail("return_entropy", "a bool", repr(return_entropy))
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point() or temperature.shape not in (shape[:1], shape):
            fail("temperature", f"a float number, or a float tensor of shape ({shape[0]},) or "
                 f"{shape} (input_ids')", f"{temperature.dtype} tensor of shape "
                 f"{tuple(temperature.shape)}")
        if temperature.requires_grad:
            fail("temperature", "a tensor that does not require grad (it is not differentiated)",
                 "requires_grad=True")
    else:
        check_options(reduction="none", temperature=temperature)
    refused = sorted(set(model_kwargs) & set(_REFUSED_KWARGS))
    if refused:
        fail("model_kwargs", "no labels, shift_labels, inputs_embeds or num_items_in_batch (the "
             "scored tokens are input_ids[:, 1:])", refused)
    return shape
