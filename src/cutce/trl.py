"""TRL: its trainers' LM-head outputs (loss, log-probs, entropy, metrics) computed by cutce.

The public spelling of :mod:`cutce.integrations.trl`::

    import cutce.trl
    cutce.trl.patch()                # before building the trainer
    trainer = trl.SFTTrainer(...)    # or DPOTrainer, GRPOTrainer, RLOOTrainer, KTOTrainer
    trainer.train()

TRL itself is imported lazily, when :func:`patch` is called.
"""

from .integrations.trl import (SUPPORTED, UnsupportedModelError, UnsupportedTRLError, add_fused_lm_head,
                               is_patched, patch, unpatch)

__all__ = ["patch", "unpatch", "is_patched", "add_fused_lm_head", "UnsupportedTRLError",
           "UnsupportedModelError", "SUPPORTED"]
