"""Hugging Face transformers: train any ``*ForCausalLM`` with cutce's loss, by one call.

The public spelling of :mod:`cutce.integrations.transformers`::

    import cutce.transformers
    cutce.transformers.patch(model)          # calls with labels compute the loss without logits
    cutce.transformers.token_log_probs(...)  # per-token log-probs / entropy of a model, for RL

transformers itself is imported lazily, when a model is patched.
"""

from .integrations.transformers import UnsupportedModelError, is_patched, patch, token_log_probs, unpatch

__all__ = ["patch", "unpatch", "is_patched", "token_log_probs", "UnsupportedModelError"]
