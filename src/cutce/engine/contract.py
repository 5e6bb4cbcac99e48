"""What a backend promises: the per-token values it returns and the functions it offers.

Every backend (the torch path, the Triton kernels; the vocabulary-parallel layer wraps either)
computes, per token i, with z the transformed logits of :class:`~cutce.engine.options.Options`::

    lse_i  = logsumexp_j z_ij
    zt_i   = z_{i, t_i}            (0 where t_i is not in [0, V): ignored or another rank's)
    zsum_i = sum_j z_ij            (0 unless opts.need_zsum)
    pz_i   = sum_j p_ij z_ij       (0 unless opts.need_entropy), p = softmax(z)

differentiable from any upstream gradient of the four, and with ``opts.need_stats`` three
metrics more, not differentiable. The api turns them into a loss or log-probs with ordinary
O(N) torch code, so an option's gradient term falls out of autograd and the backends see four
upstream vectors only. A training call whose upstream gradient is one scalar may instead take
the backend's fused function (its plan's strategy "fused").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from .options import Options
    from .planner import Plan


class Parts(NamedTuple):
    """The four differentiable per-token values, each (N,) float32 (float64 for float64)."""

    lse: Tensor
    zt: Tensor
    zsum: Tensor
    pz: Tensor


class StatParts(NamedTuple):
    """:class:`Parts` and the metrics of ``opts.need_stats``, each (N,), not differentiable:
    lse2 = logsumexp_j 2 z_ij, zmax = max_j z_ij, amax = argmax_j z_ij (int64, the first index
    of the max; a global class id under a vocabulary split)."""

    lse: Tensor
    zt: Tensor
    zsum: Tensor
    pz: Tensor
    lse2: Tensor
    zmax: Tensor
    amax: Tensor


class LossBackend(Protocol):
    """The loss's and log-probs' backend (``cutce.backends.pytorch.ce``,
    ``cutce.backends.triton.ops``). ``targets`` (N,) int64 class ids, any value outside [0, V)
    meaning no target; ``plan`` the api's (None when torch.compile traced the call: the op then
    plans at run time, :func:`cutce.engine.planner.plan_in_op`)."""

    def linear_lse_parts(self, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                         targets: Tensor, opts: Options, class_weight: Tensor | None = None,
                         plan: Plan | None = None) -> Parts | StatParts: ...

    def fused_loss(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                   coef: Tensor, opts: Options, class_weight: Tensor | None = None,
                   plan: Plan | None = None) -> tuple[Tensor, Tensor]:
        """(total, lse): total = sum_i k0 lse_i - k1 zt_i - k2 mean_j z_ij + k3 lse_i^2 with
        coef = (k0, k1, k2, k3) (4, N), its gradients formed in the forward."""


class DistillBackend(Protocol):
    """The distillation's backend (``cutce.backends.pytorch.distill``,
    ``cutce.backends.triton.distill_ops``): both heads (student hs, ws, bs; teacher ht, wt, bt),
    targets, and the call's :class:`~cutce.engine.options.Options`, whose distillation fields
    (``Options.distill_scalars``) set the divergence."""

    def distill_rows(self, hs, ws, bs, ht, wt, bt, targets, valid, opts: Options) -> Tensor:
        """Per-token losses (N,), 0 where not ``valid``, differentiable from any upstream
        gradient."""

    def distill_total(self, hs, ws, bs, ht, wt, bt, targets, coef, opts: Options,
                      plan: Plan | None = None) -> Tensor:
        """sum_i coef_i loss_i (0-dim), its gradients formed in the forward."""

    def compute_dtype(self, *dtypes) -> object: ...

    def plan_hints(self, opts: Options, device) -> dict: ...
