"""Hugging Face transformers: train any ``*ForCausalLM`` with cutce's loss, by one generic patch.

``patch(model_or_class, **loss_options)`` makes calls with ``labels`` compute the loss with
:func:`cutce.linear_cross_entropy` from the decoder's last hidden states and the ``lm_head``
weight, never materializing the N x V logits; ``unpatch`` restores the original ``forward``.
The package holds :mod:`~cutce.integrations.transformers.patching` (the loss patch; not named ``patch.py``,
since the ``patch`` function would shadow the submodule) and :mod:`~cutce.integrations.transformers.heads`
(final hidden states and head of a supported model without logits, shared by everything that
replaces the head's logits) and :mod:`~cutce.integrations.transformers.log_probs` (``token_log_probs``: per-token
log-probabilities and entropy of a model's own tokens for RL, without logits).

transformers is imported lazily: ``import cutce`` never imports it.
"""

from .heads import UnsupportedModelError
from .log_probs import token_log_probs
from .patching import is_patched, patch, unpatch

__all__ = ["patch", "unpatch", "is_patched", "token_log_probs", "UnsupportedModelError"]
