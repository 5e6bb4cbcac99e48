"""TRL: every LM-head quantity of TRL's trainers computed by cutce, by one call before the trainer.

``patch()`` replaces TRL's LM-head hook, ``trl.trainer.utils.add_fused_lm_head``, with cutce's,
which does for every model what :func:`add_fused_lm_head` below does for one: the same contract
computed with :func:`cutce.linear_log_probs`; ``unpatch()`` puts TRL's back; ``is_patched()``
says whether ``patch()`` is in effect.

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
on to more private surface: the loss of cutce.transformers.patch(model) is not what the RL and
preference trainers read (they reach a patched model's head through this same hook); patching
each trainer's log-prob method means one private method per trainer and release; replacing TRL's
kernel (``ChunkedLogProbFunction``) keeps TRL's head code around it, which reads the logit
transform from config attribute names and, off Triton devices, projects every position.

Where it is bound
-----------------
Trainer modules import the function by name, so cutce's hook is bound in ``trl.trainer.utils``
and in every loaded ``trl.*`` module holding TRL's function (found by identity, so new modules
are covered without a list); modules imported later take it from ``trl.trainer.utils``. Call
``patch()`` before the trainer is built: a model hooked earlier keeps TRL's head, and
``unpatch()`` does not unhook models already hooked by cutce's.

One hook serves both routes: ``cutce.transformers.patch`` binds it too, while a model or class is
patched (:mod:`cutce.integrations.trl_route`), so that TRL's fused call on a patched model runs
cutce's head. At hook time it picks the head per model: a model patched by
``cutce.transformers.patch`` gets cutce's with that patch's ``impl`` and ``memory_budget`` (over
``patch()``'s); any other model gets cutce's with ``patch()``'s options while ``patch()`` is in
effect, else TRL's own. TRL's own hook is bound again when neither route needs cutce's.

The fused forward
-----------------
What a call with ``fused_lm_head=True`` runs, on FSDP2 and tensor-parallel heads too, and what it
refuses rather than compute something else: :mod:`cutce.integrations.trl_forward`. With
``patch(truncation=...)`` the policy of a sampling trainer (GRPO, RLOO) is scored under the
sampler's top-k/top-p/min-p: :mod:`cutce.integrations.trl_sampler`. A TRL whose
hook does not have the signature and output class read here raises :class:`UnsupportedTRLError`.
TRL is imported lazily: ``import cutce`` does not import it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import warnings


from ..validate import check_impl, check_options, fail
from .transformers.heads import UnsupportedModelError, transformers_model
from .transformers.patch_state import ROUTE as TRANSFORMERS_ROUTE
from .transformers.patch_state import patch_options, wanted
from .trl_forward import MARK, fused_options
from .trl_forward import bind as bind_forward
from .trl_sampler import check_request, from_settings, policy_truncation

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


class UnsupportedTRLError(RuntimeError):
    """The installed TRL has no LM-head hook of the form cutce replaces."""


@dataclasses.dataclass
class _State:
    """patch()'s options, while it is in effect."""

    impl: str
    memory_budget: object
    truncation: object = None  # None, "sampler" or a Truncation (trl_sampler.check_request)


@dataclasses.dataclass
class _Bound:
    """TRL's own hook and output class, while cutce's hook is bound in their place."""

    original: object          # TRL's add_fused_lm_head
    output_class: type        # TRL's FusedCausalLMOutput


_STATE: _State | None = None
_BOUND: _Bound | None = None


def patch(*, impl: str = "auto", memory_budget: float | str | None = None,
          truncation: str | dict | None = None) -> None:
    """Make TRL's trainers compute their LM-head outputs with cutce. Call it before building the
    trainer.

    Args:
        impl, memory_budget: passed to :func:`cutce.linear_log_probs` on every fused call (a
            model patched by ``cutce.transformers.patch`` with its own keeps those).
        truncation: None (default): every model is scored with the full softmax, as TRL's own
            head does. ``"sampler"``: the policy of a trainer that samples its completions
            (GRPO, RLOO) is scored under the trainer's ``top_k``/``top_p``/``min_p`` (its
            ``generation_kwargs`` override them): the log-probs and entropy of the truncated,
            renormalised distribution, as with :func:`cutce.linear_log_probs`, except that a
            sampled token the learner's kept set drops joins it instead of getting ``-inf``
            (TRL's losses do not mask infinities). Its reference model and other trainers'
            models keep the full softmax. A dict with keys among ``top_k``, ``top_p``,
            ``min_p``: those settings for the same models instead of the trainer's. vLLM's
            "off" values (``top_k`` 0 or -1, ``top_p`` 1.0, ``min_p`` 0.0) are off. Torch
            path only (``impl="triton"`` raises). See :mod:`cutce.integrations.trl_sampler`.

    Raises:
        UnsupportedTRLError: TRL is not installed, or its ``add_fused_lm_head`` /
            ``FusedCausalLMOutput`` is missing or differs from the supported contract.
        ValueError: already patched, or an invalid option.
    """
    global _STATE
    check_impl(impl)
    check_options(reduction="none", memory_budget=memory_budget)
    truncation = check_request(truncation)
    if truncation is not None and impl == "triton":
        fail("impl", "'auto' or 'torch' with a truncation (the truncated log-probs run on the "
             "torch path)", repr(impl))
    utils = _trl_utils()
    current = getattr(utils, _NAME, None)
    if _STATE is not None or (getattr(current, MARK, False) and current is not _hook):
        raise ValueError("TRL is already patched by cutce (cutce.trl.unpatch() first)")
    bind_hook(utils)
    _STATE = _State(impl, memory_budget, truncation)


def unpatch() -> None:
    """End :func:`patch`: TRL's own ``add_fused_lm_head`` is bound again wherever cutce's was,
    unless a model or class patched by ``cutce.transformers.patch`` still needs cutce's (which
    then gives every other model TRL's own head). Models already hooked keep the head they were
    given.

    Raises ValueError when TRL is not patched.
    """
    global _STATE
    if _STATE is None:
        raise ValueError("TRL is not patched by cutce")
    _STATE = None
    release_hook()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect: ``trl.trainer.utils.add_fused_lm_head`` is cutce's and
    gives every model cutce's head (does not import TRL)."""
    utils = sys.modules.get("trl.trainer.utils")
    return _STATE is not None and utils is not None and getattr(utils, _NAME, None) is _hook


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, impl: str = "auto",
                      memory_budget: float | str | None = None, top_k: int | None = None,
                      top_p: float | None = None, min_p: float | None = None) -> None:
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
        top_k, top_p, min_p: a sampler's truncation (vLLM's values; 0 or -1, 1.0 and 0.0 are
            off): ``log_probs`` and ``entropy`` of the truncated, renormalised distribution, a
            token outside its kept set joining it (see :func:`patch`'s ``truncation``).
    """
    trunc = from_settings(dict(top_k=top_k, top_p=top_p, min_p=min_p),
                          "cutce.trl.add_fused_lm_head")
    bind_forward(_bound().output_class, model, temperature, cast_lm_head_to_fp32, outputs, impl,
                 memory_budget, "cutce.trl.add_fused_lm_head", trunc)


# --- the hook bound in TRL's modules ------------------------------------------------------------


def _hook(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
    bound = _bound()
    route = _route(model)
    if route is None:
        return bound.original(model, temperature, cast_lm_head_to_fp32, outputs)
    request = _STATE.truncation if _STATE is not None else None
    trunc = policy_truncation(request, model, sys._getframe(1))
    bind_forward(bound.output_class, model, temperature, cast_lm_head_to_fp32, outputs, *route,
                 trunc)


_hook.__name__ = _hook.__qualname__ = _NAME
_hook.__doc__ = ("cutce's add_fused_lm_head, bound in TRL's modules by cutce.trl.patch() or "
                 "cutce.transformers.patch: cutce's fused head for the models they cover, TRL's own "
                 "for the others; see cutce.integrations.trl.")
setattr(_hook, MARK, True)


def _route(model):
    """(impl, memory_budget, route name) of cutce's head for a model TRL hooks; None: TRL's."""
    options = patch_options(model)
    if options is not None:
        carried = fused_options(options, transformers_model(model))
        chosen = {"impl": "auto", "memory_budget": None, **(vars(_STATE) if _STATE else {}), **carried}
        return chosen["impl"], chosen["memory_budget"], TRANSFORMERS_ROUTE
    if _STATE is not None:
        return _STATE.impl, _STATE.memory_budget, "cutce.trl.patch"
    return None


def bind_hook(utils) -> None:
    """Bind cutce's hook in every loaded TRL module in place of TRL's own, after checking TRL
    (``utils``: the loaded ``trl.trainer.utils``); a no-op where it is bound already."""
    global _BOUND
    _check_version(sys.modules["trl"])
    original, output_class = _check_trl(utils)
    _rebind(original, _hook)
    _BOUND = _Bound(original, output_class)


def release_hook() -> None:
    """Bind TRL's own hook again when neither :func:`patch` nor a transformers patch needs ours."""
    global _BOUND
    if _BOUND is not None and _STATE is None and not wanted():
        _rebind(_hook, _BOUND.original)
        _BOUND = None


def _bound() -> _Bound:
    return _BOUND if _BOUND is not None else _Bound(*_check_trl(_trl_utils()))


# --- TRL's side -------------------------------------------------------------------------------


def _trl_utils():
    try:
        import trl
        from trl.trainer import utils
    except ImportError as e:
        raise UnsupportedTRLError(f"cutce.trl needs TRL installed ({SUPPORTED}): {e}") from e
    _check_version(trl)
    return utils


def _check_version(trl):
    version = _version_tuple(getattr(trl, "__version__", "0"))
    if version < _MIN:
        raise UnsupportedTRLError(f"TRL {trl.__version__} is not supported by cutce.trl: it needs "
                                  f"{SUPPORTED}, where every trainer asks {_NAME} for the LM head")
    if version >= _BELOW:
        warnings.warn(f"TRL {trl.__version__} is newer than cutce.trl supports ({SUPPORTED}); its "
                      f"{_NAME} has the same signature and output class, so cutce replaces it",
                      stacklevel=4)


def _version_tuple(text):
    """(major, minor) of a version string; (0, 0) when it has none."""
    match = re.match(r"\s*(\d+)\.(\d+)", str(text))
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _check_trl(utils):
    """(TRL's add_fused_lm_head, FusedCausalLMOutput), checked to be the supported contract."""
    original = getattr(utils, _NAME, None)
    if original is _hook and _BOUND is not None:
        original = _BOUND.original  # bound by cutce: check TRL's own, and its output class now
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
