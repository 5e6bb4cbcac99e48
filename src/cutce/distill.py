"""Knowledge distillation between two linear heads that share a vocabulary, without logits.

Validation reuses validate.py's helpers (each head is checked as the loss checks its head, with the
argument names prefixed ``student_``/``teacher_``); the call is described as one
:class:`~cutce.engine.problem.Problem` for the same planner as the loss's, and run by the torch
(:mod:`cutce.backends.pytorch.distill`) or Triton (:mod:`cutce.backends.triton.distill_ops`) backend.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import api, backends
from .engine.loss import token_coefs
from .engine.problem import Problem
from .parallel import distill as vocab_parallel
from .parallel import split
from .validate import check_ce_weight, check_impl, check_real, fail, make_options

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _prefixed(prefix, fn, *args, **kwargs):
    """Run an api helper; its errors name "hidden"/"weight"/"bias": say which head's."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        msg = str(e)
        if msg.startswith(("hidden", "weight", "bias")):
            raise ValueError(prefix + msg) from None
        raise


def _check_scalars(beta, temperature, student_softcap, teacher_softcap, ce_weight, targets,
                   shift, impl):
    beta = check_real("beta", beta, lo=0.0, hi=1.0)
    temperature = check_real("temperature", temperature, lo=0.0, lo_open=True)
    caps = [0.0 if c is None else check_real(name, c, lo=0.0, lo_open=True)
            for name, c in (("student_softcap", student_softcap),
                            ("teacher_softcap", teacher_softcap))]
    ce_weight = check_ce_weight(ce_weight, targets)
    if not isinstance(shift, bool):
        fail("shift", "a bool", repr(shift))
    check_impl(impl)
    return beta, temperature, caps, ce_weight


def _check_pair(student_hidden, student_weight, teacher_hidden, teacher_weight):
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if not isinstance(t, torch.Tensor):
            fail(name, "a torch.Tensor", type(t).__name__)
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        fail("teacher_hidden", f"shape {tuple(student_hidden.shape[:-1])} + (Dt,) "
             "(student_hidden's token dimensions)", tuple(teacher_hidden.shape))
    if teacher_hidden.device != student_hidden.device:
        fail("teacher_hidden device", f"student_hidden's device {student_hidden.device}",
             teacher_hidden.device)


def _check_vocab(student_hidden, student_weight, teacher_hidden, teacher_weight):
    # Unsplit calls only: under a vocabulary split the ranks compare their rows together, so
    # that a mismatch on some ranks raises on all of them.
    shaped = all(w.dim() == 2 and h.dim() >= 1 and w.shape[1] == h.shape[-1]
                 for h, w in ((student_hidden, student_weight), (teacher_hidden, teacher_weight)))
    if shaped and teacher_weight.shape[0] != student_weight.shape[0]:
        fail("teacher_weight", f"{student_weight.shape[0]} rows (student_weight's "
             "vocabulary: the heads must share the vocabulary)",
             f"shape {tuple(teacher_weight.shape)}")


# Tests turn this on to walk the kernels' 16-bit code in Triton's interpreter, whose bfloat16
# arithmetic is wrong (float16 is the only 16-bit type it computes right).
F16_TRITON = False


@backends.torch_if_kernels_do_not_fit
def linear_distillation_loss(
    student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
    targets: Tensor | None = None, *, student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None, beta: float = 0.0, temperature: float = 1.0,
    student_softcap: float | None = None, teacher_softcap: float | None = None,
    ignore_index: int = -100, ce_weight: float = 0.0, reduction: str = "mean", shift: bool = False,
    impl: str = "auto", memory_budget: float | str | None = None,
    token_weights: Tensor | None = None,
    student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
    vocab_group: ProcessGroup | None = None, vocab_start: int | None = None,
    reduce_hidden_grad: bool = True,
) -> Tensor:
    """Distillation loss between a teacher and a student head over one vocabulary, without logits.

    Args:
        student_hidden: (*, Ds) float16/bfloat16/float32/float64 student hidden states.
        student_weight: (V, Ds) student classifier, student_hidden's dtype (outside autocast).
        teacher_hidden: (*, Dt) teacher hidden states (same leading shape; Dt may differ from Ds;
            its dtype may differ from the student's). Under ``torch.no_grad()`` or detached for
            a frozen teacher: its gradients are then neither computed nor paid for.
        teacher_weight: (V, Dt) teacher classifier (same V as the student's).
        targets: (*) int64/int32 class indices in [0, V) or ``ignore_index``, or None (every
            token counts; no CE term possible).
        student_bias, teacher_bias: (V,) or None.
        beta: in [0, 1]. 0: forward KL(p || q); 1: reverse KL(q || p); in between: the
            generalized Jensen-Shannon divergence with mixture m = beta p + (1 - beta) q
            (p the teacher's, q the student's distribution). No T^2 factor (scale it yourself).
        temperature: > 0, divides both heads' logits (after softcap) for the divergence.
        student_softcap, teacher_softcap: None or > 0: ``softcap * tanh(z / softcap)``.
        ignore_index: tokens whose target equals it add nothing and are not counted by "mean".
        ce_weight: in [0, 1]: loss = (1 - ce_weight) D + ce_weight CE(student at T = 1,
            targets). Needs targets.
        reduction: "mean" (over valid tokens; all tokens without targets), "sum" or "none".
        shift: next-token layout: ``hidden[..., :-1, :]`` (both heads) and ``targets[..., 1:]``.
            A 2-D input (T, D) is one sequence; a 3-D batch (B, T, D) is shifted per row.
            Packed sequences (several documents in one row) must mark their boundaries: set
            the target at each sequence's first position to ``ignore_index``, so that no token
            is scored across a boundary (without targets, every shifted position counts).
        impl: "auto" (Triton kernels for CUDA tensors when they cover the call: both heads in
            one dtype, bfloat16/float32; else the torch path), "torch" or "triton" (an
            explicit choice that cannot run raises and says why).
        memory_budget: extra memory a training call may use beyond the gradients, as a
            fraction of the inputs' size (both heads' hidden states and weights), as in
            :func:`cutce.linear_cross_entropy` (None: 2.0 on the Triton path, 1.0 on the torch
            path). Within it, a "mean"/"sum" call (frozen teacher and beta < 1 on the Triton
            path) forms the student's gradients in the forward, token chunk by token chunk,
            computing the teacher's logits once (Triton: 8 products of N x Ds x V instead of 12
            for the forward KL, 9 instead of 17 for the JSD); its backward only scales them,
            once: a second backward raises. At the Qwen2.5 7B -> 0.5B pair with 8192 tokens the
            default gives 6 chunks of 1408 tokens (see docs/benchmarks.md). 0: the recompute
            strategy (peak ~1.1x the gradients), which may be backpropagated twice.
        token_weights: (*) float per-token weights w_i (as the loss's), or None: each token's
            loss is multiplied by w_i; "mean" divides by the valid tokens' sum of w_i.
        student_logit_scale, teacher_logit_scale: > 0, multiply each head's logits before its
            softcap (as the loss's ``logit_scale``). Applied to the hidden states and bias
            before the product (one rounding in their dtype for 16-bit inputs).
        vocab_group: a ProcessGroup over which both heads are split by vocabulary, alike (as
            :func:`cutce.linear_cross_entropy`'s): each weight/bias holds this rank's rows,
            hidden states, targets and token_weights are the same on every rank, the result is
            the unsplit one. Shard(0) DTensor weights split over their mesh without it. Runs on
            the torch path (:mod:`cutce.parallel.distill`; memory_budget does not apply).
        vocab_start: this rank's first class id, when slices are not in group-rank order.
        reduce_hidden_grad: with a split, sum both hidden states' gradients over the group in
            backward (default); False leaves each rank its slice's share.

    Returns:
        float32 tensor (float64 when both heads are float64): a scalar, or the per-token losses
        in targets' shape after shift (hidden's leading shape without targets) for "none".
        "mean" with no valid token gives 0 with zero gradients; NaN when valid tokens exist
        but their weights sum to 0 (as the loss). Equal, up to rounding, to::

            if shift: hs, ht, targets = hs[..., :-1, :], ht[..., :-1, :], targets[..., 1:]
            zs = ss * (hs @ Ws.T + bs);  zs = cs * tanh(zs / cs) if student_softcap   # float32
            zt = st * (ht @ Wt.T + bt);  zt = ct * tanh(zt / ct) if teacher_softcap
            log_q = log_softmax(zs / T, -1);  log_p = log_softmax(zt / T, -1)
            D = (log_p.exp() * (log_p - log_q)).sum(-1)                     # beta = 0
            D = (log_q.exp() * (log_q - log_p)).sum(-1)                     # beta = 1
            log_m = torch.logaddexp(log_p + log(beta), log_q + log(1 - beta))   # else
            D = beta * (log_p.exp() * (log_p - log_m)).sum(-1) \\
                + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
            loss = (1 - ce_weight) * D + ce_weight * F.cross_entropy(zs, targets, reduction="none")
            loss = w * loss where targets != ignore_index, else 0       # w: token_weights or 1
            "mean": loss.sum() / w[targets != ignore_index].sum(); "sum": loss.sum()

        No N x V tensor exists at any time. The torch path holds float32 logits of a chunk of
        tokens at a time; for "mean"/"sum" it forms the gradients in the forward (both heads'
        logits computed once, nothing of the teacher kept for the backward, which may run
        once), for "none" it recomputes both heads' chunks in the backward. The Triton path
        keeps O(N) statistics and recomputes logit tiles in the backward (the teacher's
        tensors are kept for it; :mod:`cutce.backends.triton.distill`), or, within ``memory_budget``,
        forms the student's gradients in the forward (:mod:`cutce.backends.triton.distill_fused`).
    """
    _check_pair(student_hidden, student_weight, teacher_hidden, teacher_weight)
    beta, temperature, (cap_s, cap_t), ce_weight = _check_scalars(
        beta, temperature, student_softcap, teacher_softcap, ce_weight, targets, shift, impl)
    scale_s = check_real("student_logit_scale", student_logit_scale, lo=0.0, lo_open=True)
    scale_t = check_real("teacher_logit_scale", teacher_logit_scale, lo=0.0, lo_open=True)
    opts = dataclasses.replace(
        make_options(torch.float32, ignore_index=ignore_index, reduction=reduction,
                     memory_budget=memory_budget),
        temperature=temperature, softcap=cap_s or None, beta=beta,
        teacher_softcap=cap_t or None, ce_weight=ce_weight)
    lead = student_hidden.shape[:-1]
    given = targets is not None
    if not given:
        # Every token counts: targets that are all class 0 pass the helpers' checks unchanged.
        targets = torch.zeros(lead, dtype=torch.long, device=student_hidden.device)
    # A vocabulary split (vocab_group or Shard(0) DTensors) is located here, for both heads at
    # once; collective if split. The teacher's facts join the call's one fingerprint.
    ht = teacher_hidden
    facts = {"impl": impl, "targets given": given, "student_logit_scale": scale_s,
             "teacher_logit_scale": scale_t,
             "teacher_hidden size Dt": ht.shape[-1] if ht.dim() else -1,
             "teacher_hidden dtype": str(ht.dtype).removeprefix("torch."),
             "teacher_hidden.requires_grad": torch.is_grad_enabled() and ht.requires_grad}
    (student_hidden, student_weight, student_bias, targets, token_weights, vs,
     (teacher_hidden, teacher_weight, teacher_bias)) = _prefixed(
        "student_", split.resolve, student_hidden, student_weight, student_bias, targets,
        token_weights, vocab_group, vocab_start, reduce_hidden_grad, opts=opts, shift=shift,
        teacher=(teacher_hidden, teacher_weight, teacher_bias), facts=facts)
    if vs is not None and impl == "triton":  # every rank agreed on impl: all raise alike
        fail("impl", "'torch' or 'auto' with a vocabulary split (the vocabulary-parallel "
             "distillation runs on the torch path)", repr(impl))
    if vs is None:
        _check_vocab(student_hidden, student_weight, teacher_hidden, teacher_weight)
    # One targets check for both heads (none for the zeros above), read after the kernels are
    # queued (no host sync first); the teacher's call only validates its tensors
    hs, ws, bs, t1, w1, out_shape, check = _prefixed(
        "student_", api.prepare, student_hidden, student_weight, targets, student_bias,
        token_weights, shift, ignore_index, None if vs is None else vs.vocab, given)
    ht, wt, bt, _, _, _, _ = _prefixed("teacher_", api.prepare, teacher_hidden, teacher_weight,
                                       targets, teacher_bias, None, shift, ignore_index, None,
                                       False)
    hs, bs = _scaled(hs, bs, scale_s)
    ht, bt = _scaled(ht, bt, scale_t)
    # the vocabulary-parallel distillation is the torch path's, on any device
    name = "torch" if vs is not None else api.choose_backend(impl, hs, "distill", ht,
                                                             float16=F16_TRITON)
    backend = backends.load(name, "distill")
    cdt = backend.compute_dtype(hs.dtype, ht.dtype)
    args = (hs, ws, bs, ht, wt, bt, t1)
    valid = t1 != ignore_index if given else torch.ones_like(t1, dtype=torch.bool)
    coef = None if opts.reduction == "none" else token_coefs(valid, w1, opts.reduction, cdt)
    fused, plan = False, None
    if vs is None and coef is not None:
        # a reduced call whose token weights are constants may form its gradients in the forward
        problem = Problem.of(hs, ws, opts, reduced=not (w1 is not None and w1.requires_grad),
                             teacher=(ht, wt, bt))
        # the hints read the device's configuration: eager code only (none in a traced graph)
        hints = None if torch.compiler.is_compiling() else backend.plan_hints(opts, hs.device)
        plan, settled, fused = api.plan_call(problem, name, hs.device, hints)
    if fused:
        try:
            out = backend.distill_total(
                *args, coef, dataclasses.replace(opts, memory_budget=settled.memory_budget),
                plan=plan)
        except torch.OutOfMemoryError as err:
            api.fallback_on_oom(err, problem, name)
            fused = False
    if not fused:  # per-token losses whose backward recomputes the logits (any upstream gradient)
        if vs is None:
            rows = backend.distill_rows(*args, valid, opts)
        else:
            rows = vocab_parallel.vocab_parallel_distill_rows(*args, valid, opts, vs)
        # where on valid, not on coef != 0: a token weight of 0 still gets its row's gradient
        if coef is None:
            out = rows if w1 is None else torch.where(valid, rows * w1, 0.0)
            out = out.reshape(out_shape)
        else:
            out = torch.where(valid, rows * coef.to(rows.dtype), 0.0).sum()
    if check is not None:
        check()
    return out


def _scaled(h, b, scale):
    """A logit scale s folded into the head's inputs: s (h W^T + b) = (s h) W^T + s b."""
    if scale == 1.0:
        return h, b
    cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    return (h.to(cdt) * scale).to(h.dtype), None if b is None else (b.to(cdt) * scale).to(b.dtype)
