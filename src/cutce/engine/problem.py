"""One head computation, described by shapes and facts (no tensors): what the planner reads.

Loss, log-probs/entropy and distillation are the same problem: hidden states (N, D) against a
classifier (V, D), and for distillation a second, teacher head (N, Dt) x (V, Dt) over the same
vocabulary. They differ in the per-token values asked for and in how the caller reduces them;
the planner needs only what sets the memory and the strategy, which is this.
"""

from __future__ import annotations

import dataclasses

import torch


def elt(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


@dataclasses.dataclass(frozen=True)
class Problem:
    """Attributes:
        n, v, d: tokens, classes, the student's (or only head's) features.
        dtype: the head's dtype after autocast.
        need_h, need_w: gradients asked of the hidden states and of the classifier.
        reduced: the caller reduces to a scalar whose per-token values nobody else sees
            (reduction "mean"/"sum", no returned lse, no differentiable token weights): the
            upstream gradient is known up to one scalar, so the gradients may be formed in the
            forward (the fused strategy).
        memory_budget: extra bytes allowed beyond the gradients, as a fraction of
            :meth:`input_bytes` (None: the backend's default; "auto": from the device's free
            memory, resolved by :func:`cutce.engine.planner.settle`).
        chunk_bytes: the torch backend's cap on one chunk's logit temporaries (None: default).
        smoothing: the loss has label smoothing (the Triton fused kernel does not cover it).
        dt, teacher_dtype: the teacher's features and dtype (dt 0: no teacher).
        teacher_grad: the teacher needs gradients too (distillation then never fuses).
        beta: the distillation's divergence (1: reverse KL, which never fuses).
        filtered: the backward may skip classes (filter_eps): it never keeps the logits.
    """

    n: int
    v: int
    d: int
    dtype: torch.dtype
    need_h: bool = True
    need_w: bool = True
    reduced: bool = False
    memory_budget: float | str | None = None
    chunk_bytes: int | None = None
    smoothing: bool = False
    dt: int = 0
    teacher_dtype: torch.dtype | None = None
    teacher_grad: bool = False
    beta: float = 0.0
    filtered: bool = False

    @classmethod
    def of(cls, hidden, weight, opts, *, reduced: bool, teacher=None) -> Problem:
        """The problem of a validated, flattened call, built the same way by every function:
        hidden (N, D) and weight (V, D) after autocast, ``opts`` its
        :class:`~cutce.engine.options.Options`, ``teacher`` a distillation's (hidden (N, Dt),
        weight (V, Dt), bias or None). The gradients are those autograd asks for in the current
        grad mode."""
        grad = torch.is_grad_enabled()
        facts = {}
        if teacher is not None:
            facts = dict(dt=teacher[0].shape[1], teacher_dtype=teacher[0].dtype, beta=opts.beta,
                         teacher_grad=grad and any(t is not None and t.requires_grad
                                                   for t in teacher))
        return cls(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype,
                   grad and hidden.requires_grad, grad and weight.requires_grad, reduced=reduced,
                   memory_budget=opts.memory_budget, chunk_bytes=opts.chunk_bytes,
                   smoothing=opts.label_smoothing > 0, filtered=opts.filter_eps is not None,
                   **facts)

    @property
    def distill(self) -> bool:
        return self.dt > 0

    def input_bytes(self) -> int:
        """Bytes of the hidden states and classifier weights of every head: the unit of
        ``memory_budget``. For a loss that trains both hidden and weight it equals the
        gradients' bytes."""
        own = (self.n + self.v) * self.d * elt(self.dtype)
        if not self.distill:
            return own
        return own + (self.n + self.v) * self.dt * elt(self.teacher_dtype or self.dtype)

    def gradient_bytes(self) -> int:
        """Bytes of the gradients the call returns (the student's, for distillation)."""
        return (self.need_h * self.n + self.need_w * self.v) * self.d * elt(self.dtype)
