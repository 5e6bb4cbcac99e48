"""The loss: :func:`linear_cross_entropy`, and :func:`compute_parts`, which the log-probs share.

A call validates (:mod:`cutce.validate`), applies autocast, shifts and flattens to (N, D), builds
:class:`Options` and a :class:`~cutce.engine.problem.Problem`, asks the planner for the backend and
strategy, runs the backend, which returns the O(N) parts of the backend contract (see
:mod:`cutce.backends.pytorch.ce`) or, for a fused training call, the reduced loss; then forms the
loss from the parts with ordinary differentiable torch code.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from . import announce, backends
from .engine import loss, planner
from .engine.contract import Parts, StatParts
from .engine.options import Options
from .engine.problem import Problem
from .parallel import split
from .parallel import vocab as distributed
from .validate import (autocast_dtype, check_flag, check_impl, check_target_range, fail,
                       make_options, prepare, row_temperatures)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_log = logging.getLogger("cutce")


def choose_backend(impl, hidden, kind="loss", teacher=None, float16=True) -> str:
    """The planner's backend ("torch" | "triton") for a validated call (see
    :func:`cutce.engine.planner.choose_backend`); a broken Triton install warns once."""
    check_impl(impl)
    name, reason = planner.choose_backend(
        impl, hidden.is_cuda, lambda: backends.triton_reason(hidden, kind, teacher, float16))
    backends.fallback_notice(reason)
    return name


def settle(problem, name, device, **hints):
    """(plan, problem with a numeric budget) for an eager call. Only ``memory_budget="auto"``
    reads the device's free memory (once; the allocator's statistics cost ~0.1 ms, paid only by
    those who ask); a plan that the free memory cannot hold then falls back to the minimum and
    warns once. Other budgets are planned as given and fall back only if the device actually
    runs out (:func:`fallback_on_oom`). Under torch.compile: (None, problem), "auto" as the
    default, since the ops plan again at run time and N must not be specialized on."""
    if torch.compiler.is_compiling():
        if problem.memory_budget == "auto":
            problem = dataclasses.replace(problem, memory_budget=None)
        return None, problem
    free = backends.free_memory(device) if problem.memory_budget == "auto" else None
    plan, budget, why = planner.settle(problem, name, free, **hints)
    if _log.isEnabledFor(logging.DEBUG):  # the plan made visible: logging.getLogger("cutce")
        _log.debug("cutce plan: %s N=%d V=%d D=%d%s %s, memory_budget=%r -> %r, free=%s: %s",
                   "distillation" if problem.distill else "loss", problem.n, problem.v,
                   problem.d, f" Dt={problem.dt}" if problem.distill else "", problem.dtype,
                   problem.memory_budget, budget, free, plan)
    if why is not None:
        backends.warn_memory_fallback(why, (problem.memory_budget, name, problem.distill))
    if budget != problem.memory_budget:
        problem = dataclasses.replace(problem, memory_budget=budget)
    return plan, problem


def plan_call(problem, name, device, hints=None):
    """(plan, problem with a numeric budget, whether the call takes the fused strategy): the one
    planning step of every function. ``hints``: the backend's planner hints (a dict), read in
    eager code only; under torch.compile only static facts decide (never N, so that compile
    does not specialize on it) and the op plans again at run time, possibly running the
    recompute kernels inside. In eager code a call the plan would not fuse keeps the recompute
    strategy's own backward (gradients allocated in the backward, not held from the forward
    on)."""
    plan, problem = settle(problem, name, device, **(hints or {}))
    fuses = planner.may_fuse(problem, name) and (plan is None or plan.fused)
    return plan, problem, fuses


def fallback_on_oom(err, problem, name):
    """A fused call ran out of device memory: say so once; the caller reruns at the minimum.
    Re-raises under torch.compile (no second plan inside a graph)."""
    if torch.compiler.is_compiling():
        raise err
    least = planner.need_bytes(dataclasses.replace(problem, memory_budget=0.0), planner.RECOMPUTE,
                               name)
    backends.warn_memory_fallback(
        f"cutce: memory_budget={problem.memory_budget!r} planned the fused strategy, which ran out "
        f"of device memory ({str(err).splitlines()[0][:120]}); running the minimum-memory "
        f"strategy instead (memory_budget=0, about {least / 2**30:.2f} GiB)",
        (problem.memory_budget, name, problem.distill))


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None, logit_scale: float = 1.0,
    token_weights: Tensor | None = None, shift: bool = False, return_lse: bool = False,
    filter_eps: float | str | None = None, impl: str = "auto",
    memory_budget: float | str | None = None,
    chunk_bytes: int | None = None, class_weight: Tensor | None = None,
    vocab_group: ProcessGroup | None = None, vocab_start: int | None = None,
    reduce_hidden_grad: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of a linear classifier's logits, without materializing the logits.

    Args:
        hidden: (*, D) float16/bfloat16/float32 (float64 on the torch path) last hidden states.
        weight: (V, D) classifier weight, hidden's dtype (outside torch.autocast).
        targets: (*) int64 or int32 class indices in [0, V) or ``ignore_index``.
        bias: (V,) or None.
        ignore_index: targets equal to it add no loss and are not counted by "mean".
        reduction: "mean" | "sum" | "none".
        label_smoothing: ls in [0, 1]. z_loss: coefficient of lse**2, >= 0.
        softcap: None or > 0 (Gemma 2/3). logit_scale: > 0, applied before softcap.
        token_weights: (*) float per-token weights w_i, or None.
        class_weight: (V,) float per-class weights c (PyTorch's ``weight=`` of F.cross_entropy;
            not differentiated), or None. With a vocabulary split, this rank's slice of them.
        shift: next-token prediction: ``hidden[..., :-1, :]`` predicts ``targets[..., 1:]``.
            A 2-D ``hidden`` (T, D) is one sequence; a 3-D batch (B, T, D) is shifted per row
            (no row predicts the next row's first token). Packed sequences (several documents
            in one row) must mark their boundaries themselves: set the target at each
            sequence's first position to ``ignore_index``, so that no token predicts across a
            boundary (the last token of one sequence would otherwise be scored on the next
            one's first token).
        return_lse: also return the per-token log-sum-exp (float32, differentiable).
        filter_eps: None (default) gives exact gradients. A float in (0, 1] or "auto" (2^-12 for
            bf16, 2^-15 for fp16, 2^-24 for fp32) lets the Triton backward skip the classes whose
            probability is below it for every row (and that are no row's target; when more than
            half the classes are kept, it visits all, exactly). This is an approximation: the
            skipped softmax tail adds up, and on realistic data (many small probabilities) the
            gradient error can be orders of magnitude above the bf16 rounding error; ``cutce
            bench`` reports it. Ignored by the torch path, which is always exact.
        impl: "auto" (Triton for CUDA tensors when it can run, else torch), "torch" or "triton".
            An explicit "triton" that cannot run raises and says why; "auto" with CUDA tensors
            whose Triton import fails warns once (naming the error) and runs the torch path.
        memory_budget: extra memory a training call may use beyond the gradients, as a
            fraction of the inputs' size (hidden and weight; for a call that trains both, the
            gradients' size). None: 2.0 on the Triton path, 1.0 on the torch path, whose
            chunks gain nothing from more. Within it, a call whose gradient is
            a scalar's (reduction "mean"/"sum", no return_lse, no filter_eps, no vocab_group;
            on the Triton path also no label_smoothing and bfloat16/float32 inputs)
            computes each token chunk's logits once and forms dE and dC right away (three
            N x D x V products instead of four: faster, same exactness); below what that needs,
            or at 0, the backward recomputes the logits (memory: gradients + ~8%). A call with
            per-token outputs (reduction "none", return_lse) on the Triton path whose budget
            holds all N x V logits in the inputs' dtype keeps them from the forward to the
            backward instead (eager calls): one product fewer (a second backward through the
            same outputs recomputes them). A fused call's gradients are handed out once:
            backpropagating twice through the same loss (retain_graph) raises; use
            memory_budget=0 for that. The recompute backward (Triton path, more than one token
            chunk) sums dC in float32 when the budget covers a V x D float32 buffer (the
            default always does), else rounds it per token chunk.
            "auto": the budget the device's free memory leaves (read once per call, in eager
            code on CUDA; the default's elsewhere): the fastest plan that fits. Whatever the
            budget, a plan that the free memory cannot hold falls back to memory_budget=0 and
            warns once. See
            :mod:`cutce.engine.planner` and docs/benchmarks.md for time against budget.
        chunk_bytes: memory budget of one chunk of logits on the torch path (default 256 MiB).
        vocab_group: a torch.distributed ProcessGroup over which the classifier is split by
            vocabulary (see :mod:`cutce.parallel.vocab` and docs/distributed.md): ``weight``/``bias``
            hold this rank's contiguous slice, slices in group-rank order tile [0, V); hidden,
            targets (global ids) and token_weights are the same on every rank; the result is the
            unsplit one on every rank. A weight that is a DTensor with Shard(0) is split over
            its mesh without this keyword; a replicated DTensor acts as a plain tensor.
        vocab_start: this rank's first class id, when slices are not in group-rank order.
        reduce_hidden_grad: with a vocabulary split, sum hidden's gradient over the group in
            backward (default). False leaves each rank its slice's share of it, for layouts
            whose own collective (e.g. a sequence-parallel all-gather's backward) sums it.

    Returns:
        loss, or (loss, lse) with ``return_lse``. It equals, up to rounding, in float32 (float64
        for float64 inputs)::

            if shift: hidden = hidden[..., :-1, :]; targets = targets[..., 1:]; w = w[..., 1:]
            z      = logit_scale * (hidden @ weight.T + bias)
            z      = softcap * tanh(z / softcap)    if softcap
            lse    = logsumexp(z, -1)
            loss_i = (1 - ls) * (lse - z[target]) + ls * (lse - z.mean(-1)) + z_loss * lse**2
            loss_i = w_i * loss_i on valid tokens (target != ignore_index), 0 on ignored ones
            "none" -> loss_i with targets' shape (after shift); "sum" -> sum_i loss_i
            "mean" -> sum_i loss_i / sum_valid w_i, and 0.0 (zero gradients) when nothing is
                      valid; NaN when valid tokens exist but their weights sum to 0 (0/0, as
                      F.cross_entropy with all-zero class weights)

        With class_weight c, as F.cross_entropy(z, targets, weight=c, label_smoothing=ls)::

            loss_i = (1 - ls) * c[target] * (lse - z[target])
                     + ls / V * (c.sum() * lse - (z * c).sum(-1)) + z_loss * lse**2
            "mean" -> sum_i w_i loss_i / sum_valid w_i c[target_i]

        lse has targets' shape (after shift), float32 (float64 for float64 inputs).

    Reproducibility: no backend uses floating-point atomics or another order-dependent
    reduction, so the loss and gradients are bitwise identical from run to run for the same
    inputs, options, device and library versions (``filter_eps`` included).

    A valid row whose hidden state holds a NaN or an infinity (+inf or -inf) gives a NaN loss
    (its logits mix infinities), as ``F.cross_entropy(hidden @ weight.T, targets)`` does.
    Ignored rows give no loss (a finite loss even when their hidden state is NaN/inf), but
    their hidden states still enter the logit products of the backward: a NaN/inf there makes
    that row of hidden's gradient and the whole weight gradient NaN, as in PyTorch's own
    ``F.linear`` + ``F.cross_entropy``. Mask such rows before the call, e.g.
    ``hidden.masked_fill(~valid[..., None], 0)``.
    """
    if not isinstance(return_lse, bool):
        fail("return_lse", "a bool", repr(return_lse))
    opts = make_options(autocast_dtype(hidden) if isinstance(hidden, torch.Tensor) else torch.float32,
                        ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                        logit_scale=logit_scale, filter_eps=filter_eps,
                        chunk_bytes=chunk_bytes, memory_budget=memory_budget, lse_out=return_lse)
    # The fused strategy needs the upstream gradient up to one scalar: a scalar loss whose
    # per-token values nobody else sees (no lse out, no differentiable token weights).
    fusable = (opts.reduction != "none" and not return_lse and opts.filter_eps is None
               and not (isinstance(token_weights, torch.Tensor) and token_weights.requires_grad))
    call = compute_parts(
        hidden, weight, targets, bias, token_weights, shift, impl, opts, vocab_group,
        vocab_start, reduce_hidden_grad, return_lse=return_lse, fusable=fusable,
        class_weight=class_weight)
    if isinstance(call.parts, Fused):
        return call.parts.total
    out = loss.loss_from_parts(call.parts, call.valid, call.token_weights, opts, call.vocab,
                               call.class_weight)
    out = out.reshape(call.out_shape) if opts.reduction == "none" else out
    return (out, call.parts.lse.reshape(call.out_shape)) if return_lse else out


class Fused(NamedTuple):
    total: torch.Tensor  # the reduced loss, from the fused strategy


class Call(NamedTuple):
    """What :func:`compute_parts` returns: the parts (or ``Fused``), flat targets and token
    weights, the output shape, the global V and the class weights (None without)."""

    parts: Parts | StatParts | Fused
    targets: torch.Tensor
    token_weights: torch.Tensor | None
    out_shape: torch.Size
    vocab: int
    class_weight: loss.ClassWeights | None
    valid: torch.Tensor  # (N,) bool: target != ignore_index, the one decision of what counts
    soft_applied: bool = False  # the fused total holds the soft targets' term (compute_parts)


def _class_weights(class_weight, t1, valid, weight, vs, dtype):
    """Validate class_weight (this rank's slice under a vocabulary split) and derive its terms."""
    local_v = weight.shape[0]
    if not isinstance(class_weight, torch.Tensor) or not class_weight.is_floating_point():
        fail("class_weight", "None or a float tensor", getattr(class_weight, "dtype", type(class_weight)))
    if class_weight.shape != (local_v,):
        what = "this rank's vocabulary slice" if vs is not None else "weight's rows"
        fail("class_weight", f"shape ({local_v},) ({what})", tuple(class_weight.shape))
    if class_weight.device != weight.device:
        fail("class_weight device", f"weight's device {weight.device}", class_weight.device)
    if class_weight.requires_grad:
        fail("class_weight", "a tensor that does not require grad (it is not differentiated)",
             "requires_grad=True")
    if vs is None:
        return loss.class_weight_terms(class_weight.detach().to(dtype), t1, valid)
    return loss.class_weight_terms(class_weight.detach().to(dtype), t1, valid, vs.start,
                                   lambda x: distributed.sum_over_group(x, vs))


@backends.torch_if_kernels_do_not_fit
def compute_parts(hidden, weight, targets, bias, token_weights, shift, impl, opts: Options,
                  vocab_group=None, vocab_start=None, reduce_hidden_grad=True, return_lse=False,
                  fusable=False, class_weight=None, tname="targets", temperature=None,
                  soft=None) -> Call:
    """Validate, flatten and dispatch: the backend contract's parts for a public function.
    ``tname``: the user's name of the targets argument, for error messages. ``temperature``:
    None or per-token temperatures (targets' shape, shifted like them), which divide each row's
    logits on top of ``opts.temperature`` (see :func:`cutce.validate.row_temperatures`).

    With ``fusable`` (the caller reduces the loss to a scalar, see linear_cross_entropy) and a
    plan that fuses, parts is a ``Fused`` holding the reduced loss instead.

    ``soft``: None, or (ids, a) for a fusable call with flat targets: (N, K) int64 class ids
    (distinct per row, -1 for none; unsplit) and float coefficients, not differentiated. The
    targets then only anchor the fused pass (any class near the row's top): a ``Fused`` total
    is sum_i w_i lse_i - sum_ij a_ij z_{i, ids_ij}, and ``soft_applied`` says that its backend
    formed the second sum's gradient in place (the fused strategy, unsplit, not traced on
    the Triton path); otherwise the caller adds that sum itself to sum_i w_i lse_i.
    """
    # Vocabulary parallelism (vocab_group, DTensor weight): vs locates this rank's slice (None if
    # not split). Collective when split, so every rank must make this call; it checks that every
    # rank passed the same options (opts, shift, return_lse, grad mode, ...).
    # the fused strategy has no per-row temperature (log-probs never fuse)
    fusable = fusable and temperature is None
    temperature = split.replicated_local("temperature", temperature)
    hidden, weight, bias, targets, token_weights, vs, _ = split.resolve(
        hidden, weight, bias, targets, token_weights, vocab_group, vocab_start, reduce_hidden_grad,
        opts=opts, shift=shift, return_lse=return_lse, class_weight=class_weight, tname=tname,
        temperature=temperature, facts={"impl": impl})
    h2, weight, bias, t1, w1, out_shape, _ = prepare(
        hidden, weight, targets, bias, token_weights, shift, opts.ignore_index,
        vocab=None if vs is None else vs.vocab, check_targets=False, tname=tname)
    vocab = weight.shape[0] if vs is None else vs.vocab
    # Which tokens count is decided here, once: the loss, the log-probs and the class weights
    # read ``valid``; the backends get -1 (no target) where it is False, which their own rule
    # (a class in [0, V)) reads the same way whatever ignore_index is.
    valid = t1 != opts.ignore_index
    tb = torch.where(valid, t1, -1)
    cdt = torch.float64 if h2.dtype == torch.float64 else torch.float32
    cw = None if class_weight is None else _class_weights(class_weight, t1, valid, weight, vs, cdt)
    inv_temp, temp_check = None, None
    if temperature is not None:
        inv_temp, temp_check = row_temperatures(temperature, targets, hidden, t1, shift,
                                                opts.ignore_index, cdt, tname)
    zsum_cw = cw.local if cw is not None and opts.need_zsum else None  # only smoothing reads it
    name = choose_backend(impl, h2)
    be = backends.load(name, "loss")
    problem = Problem.of(h2, weight, opts, reduced=fusable and vs is None)
    plan, problem, fuses = plan_call(problem, name, h2.device)
    if problem.memory_budget != opts.memory_budget:  # "auto" resolved, or the fallback
        opts = dataclasses.replace(opts, memory_budget=problem.memory_budget)
    fused = be.fused_loss if fuses else None
    if (fused is not None and name == "triton" and cw is None and not opts.label_smoothing
            and not torch.compiler.is_compiling()):
        # eager Triton training call: one launch for the targets check's flag and the row
        # coefficients (under torch.compile the torch ops below stay, for the compiler to fuse)
        from .backends.triton import rows
        coef, bad = rows.row_coefs(t1, w1, vocab, opts.ignore_index, opts.z_loss,
                                   opts.reduction == "mean")
        check = check_flag(bad, t1, vocab, opts.ignore_index, defer=True, tname=tname)
    else:
        check = check_target_range(t1, vocab, opts.ignore_index, defer=True, tname=tname)
        coef = None if fused is None else loss.row_coefs(valid, w1, opts, cdt, cw, vocab)
    parts = None
    strategy = None if plan is None else plan.strategy  # None: traced, planned again at run time
    soft_kw = {}
    if soft is not None and fused is not None:
        coef = torch.stack([coef[0], torch.zeros_like(coef[1]), coef[2], coef[3]])
        # a traced Triton call plans in the op, whose unfused fallback has no soft targets
        if vs is None and (name == "torch" or plan is not None):
            soft_kw = {"soft": soft}
    if fused is not None:
        try:
            parts = Fused(fused(h2, weight, bias, tb, coef, opts, class_weight=zsum_cw,
                                plan=plan, **soft_kw)[0])
        except torch.OutOfMemoryError as err:
            fallback_on_oom(err, problem, name)
            opts = dataclasses.replace(opts, memory_budget=0.0)
            plan = planner.plan(dataclasses.replace(problem, memory_budget=0.0), name)
            strategy = plan.strategy
    if strategy is not None:  # a route's first call says that cutce runs, and how
        announce.planned(problem, name, strategy, vocab)
    if parts is None and vs is None:
        parts = be.linear_lse_parts(h2, weight, bias, tb, opts, class_weight=zsum_cw,
                                    inv_temp=inv_temp, plan=plan)
    elif parts is None:
        parts = distributed.vocab_parallel_parts(
            functools.partial(be.linear_lse_parts, plan=plan), h2, weight, bias, tb, opts, vs,
            class_weight=zsum_cw, inv_temp=inv_temp)
    for pending in (check, temp_check):
        if pending is not None:
            pending()
    return Call(parts, t1, w1, out_shape, vocab, cw, valid,
                isinstance(parts, Fused) and bool(soft_kw))
