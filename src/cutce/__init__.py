"""cutce: the language-model head's loss (linear classifier + cross-entropy) without the logits.

Cut Cross-Entropy (Wijmans et al., 2024): the log-sum-exp over the vocabulary is computed block by
block and only the target logit is indexed, so the N x V logit matrix is never held in memory.
"""

from .api import linear_cross_entropy
from .module import LinearCrossEntropyLoss
from .distill import linear_distillation_loss
from .sparse_distill import linear_sparse_distillation_loss
from .log_probs import TokenStats, linear_log_probs
from .engine.options import Options

__version__ = "0.1.0"
__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss", "linear_log_probs", "TokenStats", "linear_distillation_loss",
           "linear_sparse_distillation_loss", "Options", "__version__"]
