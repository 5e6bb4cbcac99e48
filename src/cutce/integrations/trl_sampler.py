"""``cutce.trl.patch(truncation=...)``: the policy's log-probs under the sampler's truncation.

What it is for
--------------
GRPO and RLOO sample their completions with the trainer's ``top_k``, ``top_p`` and ``min_p``
(vLLM's ``SamplingParams`` or transformers' ``generate``), then score them with the full softmax.
The learner's log-probs are then not the behaviour policy's: every kept token's probability is
scaled down by its kept set's mass, which biases the importance ratios, and TRL's vLLM
importance-sampling correction compares them with vLLM's ``processed_logprobs``, which are the
truncated ones. With ``truncation`` the policy's log-probs and entropy are those of the truncated,
renormalised distribution, in vLLM's order (:class:`cutce.engine.options.Options`).

Which models, which settings
----------------------------
TRL's hook has no parameter for the sampler, so cutce reads it from the trainer that calls the
hook: TRL's trainers call it from their ``__init__``, where the calling frame's ``self`` is the
trainer and its ``args`` (or the ``args`` being built, before ``Trainer.__init__`` has stored it)
hold ``top_k``/``top_p``/``min_p``. Only such a trainer (GRPO, RLOO, the async GRPO) and only its
policy is truncated; its reference model, and every model of a trainer whose tokens do not come
from a sampler (SFT, DPO, KTO), keep the full softmax. The reference stays untruncated because a
token its own sampler would have dropped gets a finite log-prob there, so the KL term is the
(finite) divergence of the truncated policy from the full reference.

``truncation="sampler"`` takes the trainer's ``args.top_k``, ``top_p``, ``min_p``, each overridden
by ``args.generation_kwargs`` where it has the key (TRL passes those last to both samplers). A
mapping with ``top_k``/``top_p``/``min_p`` gives the settings instead (a sampler TRL does not run,
e.g. a custom rollout server). Either way vLLM's and TRL's "off" values are off: ``top_k`` None,
0 or -1, ``top_p`` None or 1.0, ``min_p`` None or 0.0.

Tokens outside the kept set
---------------------------
TRL's losses compute ``logp - old_logp``, ``exp(ref - logp)`` and ``logp * mask`` without masking
infinities, so one ``-inf`` makes the step's loss NaN. A sampled token is in the kept set of the
weights that sampled it, but the learner may drop it: rounding at a top-p or min-p boundary (the
sampler's logits are not the training forward's, bit for bit), or weights updated since the
rollout. Such a token joins its kept set (:func:`cutce.truncated_log_probs.sampled_log_probs`):
its log-prob is finite, and every kept token's is exactly the truncated distribution's.

What raises instead of truncating something else
------------------------------------------------
- A trainer with a KL term (``beta != 0``) and no reference model: TRL then computes the
  reference log-probs with the policy's own forward (a PEFT adapter disabled), which cutce cannot
  tell from the policy's and would truncate.
- ``truncation="sampler"`` with both ``top_p`` and ``min_p`` on when TRL samples with
  transformers (``use_vllm=False``): transformers applies top-p before min-p, vLLM (and cutce)
  after, and the two keep different sets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from ..validate import truncation_settings
from .transformers.heads import transformers_model

class Truncation(NamedTuple):
    """A sampler's settings as cutce.trl holds them per hooked policy (None: that step is off),
    passed to :func:`cutce.truncated_log_probs.sampled_log_probs` as its keywords."""

    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None


SAMPLER = "sampler"
KEYS = ("top_k", "top_p", "min_p")
# The hook is called from the trainer's __init__; a few frames allow for a subclass or a wrapper
# between them, without walking the whole stack of an unrelated caller.
_FRAMES = 6


def check_request(truncation):
    """``patch()``'s ``truncation``, validated: None, ``"sampler"`` or a :class:`Truncation`
    (a mapping whose values are all off gives None)."""
    if truncation is None or truncation == SAMPLER:
        return truncation
    if not isinstance(truncation, Mapping) or not set(truncation) <= set(KEYS):
        got = sorted(truncation) if isinstance(truncation, Mapping) else repr(truncation)
        raise ValueError(f"truncation: expected None, {SAMPLER!r} or a mapping with keys among "
                         f"{KEYS}, got {got}")
    return from_settings(dict(truncation), "truncation")


def from_settings(values: dict, where: str) -> Truncation | None:
    """The Truncation of vLLM-style settings (missing keys and off values: off); ``where`` names
    their source in the error."""
    values = {k: values.get(k) for k in KEYS}
    if values["top_k"] in (0, -1) and not isinstance(values["top_k"], bool):
        values["top_k"] = None  # vLLM's and TRL's "no top-k"
    try:
        trunc = Truncation(*truncation_settings(**values))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return None if trunc == Truncation() else trunc


def policy_truncation(request, model, frame) -> Truncation | None:
    """The truncation of ``model``'s fused head when the hook was called from ``frame``: the
    request's (or the trainer's) settings if the caller is a sampling trainer and ``model`` its
    policy, else None."""
    if request is None:
        return None
    found = _sampling_trainer(frame)
    if found is None:
        return None
    trainer, args, candidates = found
    base = transformers_model(model)
    if not any(c is not None and transformers_model(c) is base for c in candidates):
        return None  # the reference model, or another model the trainer hooks
    name = type(trainer).__name__
    beta = getattr(trainer, "beta", 0.0)
    if beta and getattr(trainer, "ref_model", None) is None:
        raise ValueError(
            f"{name}: expected beta=0 or a separate reference model with cutce.trl.patch("
            f"truncation=...), got beta={beta} with the reference log-probs computed by the "
            "policy's own forward (a PEFT adapter disabled), which cutce cannot tell from the "
            "policy's and would truncate")
    if isinstance(request, Truncation):
        return request
    values = {k: getattr(args, k) for k in KEYS}
    extra = getattr(args, "generation_kwargs", None)
    if isinstance(extra, Mapping):
        values.update({k: extra[k] for k in KEYS if k in extra})
    trunc = from_settings(values, f"{type(args).__name__}'s sampler settings")
    if (trunc is not None and trunc.top_p is not None and trunc.min_p is not None
            and not getattr(args, "use_vllm", True)):
        raise ValueError(
            f"{name}: expected top_p or min_p, not both, with cutce.trl.patch(truncation="
            f"{SAMPLER!r}) when TRL samples with transformers' generate (use_vllm=False): it "
            "applies top-p before min-p, vLLM and cutce after, and the two keep different sets; "
            f"got top_p={trunc.top_p}, min_p={trunc.min_p}")
    return trunc


def _sampling_trainer(frame):
    """(trainer, its sampler args, candidate policies) of the nearest calling frame whose
    ``self`` holds sampler settings; None if there is none."""
    for _ in range(_FRAMES):
        if frame is None:
            return None
        local = frame.f_locals
        owner = local.get("self")
        if owner is not None:
            for args in (getattr(owner, "args", None), local.get("args")):
                if args is not None and all(hasattr(args, k) for k in KEYS):
                    return owner, args, (local.get("model"), getattr(owner, "model", None))
        frame = frame.f_back
    return None
