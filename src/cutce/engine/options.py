"""The one bundle of loss options that every backend receives.

`api.py` validates user input and builds an :class:`Options`; backends (the torch path, the Triton
ops, the vocabulary-parallel layer) read it and never re-validate. It is frozen so that it can be
hashed, cached and passed through ``torch.compile`` as a constant.
"""

from __future__ import annotations

import dataclasses

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton")

# The CCE paper's threshold, per gradient dtype: entries of |softmax - onehot| below it are
# treated as zero when filtering is asked for (roughly the dtype's rounding unit).
AUTO_FILTER_EPS = {"bfloat16": 2.0**-12, "float16": 2.0**-15, "float32": 2.0**-24, "float64": 2.0**-24}

@dataclasses.dataclass(frozen=True)
class Options:
    """Loss options after validation.

    The logit transform every backend applies, per token i and class j::

        y_ij = logit_scale * (hidden_i . weight_j + bias_j)        # float32 (float64 for float64)
        z_ij = softcap * tanh(y_ij / softcap) if softcap else y_ij
        z_ij = z_ij / temperature
        z_ij = z_ij * inv_temp_i    # per-token temperatures only (linear_log_probs with a tensor)

    Per-token temperatures are data, not options: they travel as an (N,) tensor of inverse
    temperatures beside the targets (the backends' ``inv_temp``), so that this bundle stays a
    hashable constant; ``temperature`` is then 1.

    Attributes:
        ignore_index: targets equal to it contribute nothing (no loss, not counted by "mean").
        reduction: "mean" | "sum" | "none".
        label_smoothing: weight ls of the uniform target distribution, in [0, 1].
        z_loss: coefficient of lse**2, >= 0.
        softcap: None or > 0.
        logit_scale: > 0, multiplies the logits before softcap.
        temperature: > 0, divides the logits after softcap (linear_log_probs with a float; 1 for
            the loss and for per-token temperatures).
        filter_eps: None for exact gradients, else the probability under which a class that is
            no row's target is skipped by the backward when it is below it for every row
            (resolved from "auto" by the api).
        need_entropy: the backend must also produce sum_j p_ij z_ij.
        chunk_bytes: memory budget of one chunk of logits on the torch path (None = default).
        memory_budget: extra memory of a training call beyond the gradients, as a fraction of
            the inputs' size (None: the backend's default; "auto": from the device's free
            memory, resolved per call); picks the strategy (see cutce.engine.planner).
        lse_out: the caller returns the lse, whose gradient may reach every row (ignored ones
            included): filtering must then bound the classes over all rows, not only over the
            rows with a target.
        need_stats: the backend must also produce, per token, lse2 = logsumexp_j(2 z_ij), the
            largest logit max_j z_ij and its first index argmax_j z_ij (a global class id under
            a vocabulary split), none of them differentiable; it also turns zsum on (the
            metrics' mean logit is zsum / V). See cutce.backends.pytorch.ce.
        beta, teacher_softcap, ce_weight: the distillation's (cutce.linear_distillation_loss):
            the divergence (0 forward KL, 1 reverse KL, else the JSD), the teacher head's
            softcap (None or > 0; ``softcap`` is the student's), the CE term's weight. The
            distillation's ``temperature`` divides both heads' logits for the divergence.
        top_k, top_p, min_p: a sampler's truncation (cutce.linear_log_probs), None where that
            step is off: top_k an int >= 1 (a k at or above V keeps everything), top_p in
            (0, 1), min_p in (0, 1] (the api turns top_p = 1.0 and min_p = 0.0, which keep every
            token, into None, so that such a call runs the untruncated path bit for bit). The
            kept set of a row of z, in the order vLLM's v1 sampler applies them (temperature
            first, then min-p, then top-k, then top-p)::

                min-p:  keep j where softmax(z)_j >= min_p * max_i softmax(z)_i
                top-k:  keep j where z_j >= the k-th largest of the logits min-p kept (ties kept)
                top-p:  over the softmax of what is left, sorted ascending, drop the tokens whose
                        cumulative probability (their own included) is <= 1 - top_p; the
                        largest is always kept, and a token tied with a kept one is kept

            Each step keeps every logit at or above some value, so the kept set of a row is
            ``{j : z_j >= threshold}`` for one threshold per row (see
            cutce.backends.pytorch.truncated).
    """

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    temperature: float = 1.0
    filter_eps: float | None = None
    need_entropy: bool = False
    chunk_bytes: int | None = None
    memory_budget: float | str | None = None
    lse_out: bool = False
    need_stats: bool = False
    beta: float = 0.0
    teacher_softcap: float | None = None
    ce_weight: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    @property
    def truncates(self) -> bool:
        """Whether a sampler's truncation is on (the log-probs then run the truncated path)."""
        return self.top_k is not None or self.top_p is not None or self.min_p is not None

    @property
    def need_zsum(self) -> bool:
        """Whether sum_j z_ij is needed (label smoothing, or the per-token statistics' mean logit)."""
        return self.label_smoothing > 0.0 or self.need_stats

    def distill_scalars(self) -> tuple[float, float, float, float, float]:
        """(beta, temperature, student softcap, teacher softcap, ce_weight) as the distillation
        kernels take them (a softcap of 0.0 is none)."""
        return (float(self.beta), float(self.temperature), float(self.softcap or 0.0),
                float(self.teacher_softcap or 0.0), float(self.ce_weight))
