"""Public functions: the only place that validates user input.

A call validates, applies autocast, shifts and flattens to (N, D), builds :class:`Options`,
dispatches to a backend that returns the O(N) parts of the backend contract (see
:mod:`cutce.backends.pytorch.ce`), then forms the loss from them with ordinary differentiable torch code.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from . import backends
from .engine import loss, planner
from .engine.options import AUTO_FILTER_EPS, IMPLS, REDUCTIONS, Options
from .engine.problem import Problem
from .parallel import vocab as distributed

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(what, expected, got):
    raise ValueError(f"{what}: expected {expected}, got {got}")


def _check_real(name, value, lo=None, lo_open=False, hi=None):
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) floats may be symbolic.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < math.inf:
        _fail(name, "a finite number", repr(value))
    if lo is not None and (value <= lo if lo_open else value < lo):
        _fail(name, f"a number {'>' if lo_open else '>='} {lo}", repr(value))
    if hi is not None and value > hi:
        _fail(name, f"a number <= {hi}", repr(value))
    return float(value)


def _filter_eps(filter_eps, dtype):
    if filter_eps is None:
        return None
    if filter_eps == "auto":
        return AUTO_FILTER_EPS[str(dtype).removeprefix("torch.")]
    return _check_real("filter_eps", filter_eps, lo=0.0, lo_open=True, hi=1.0)


def make_options(dtype, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None, logit_scale=1.0, temperature=1.0, filter_eps=None,
                 need_entropy=False, chunk_bytes=None,
                 memory_budget=None, lse_out=False) -> Options:
    """Validate scalar options and bundle them (``dtype`` resolves ``filter_eps="auto"``)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        _fail("ignore_index", "an int", repr(ignore_index))
    if reduction not in REDUCTIONS:
        _fail("reduction", f"one of {REDUCTIONS}", repr(reduction))
    if softcap is not None:
        softcap = _check_real("softcap", softcap, lo=0.0, lo_open=True)
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                    or chunk_bytes < 1):
        _fail("chunk_bytes", "None or a positive int", repr(chunk_bytes))
    return Options(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=_check_real("label_smoothing", label_smoothing, lo=0.0, hi=1.0),
        z_loss=_check_real("z_loss", z_loss, lo=0.0),
        softcap=softcap,
        logit_scale=_check_real("logit_scale", logit_scale, lo=0.0, lo_open=True),
        temperature=_check_real("temperature", temperature, lo=0.0, lo_open=True),
        filter_eps=_filter_eps(filter_eps, dtype),
        need_entropy=bool(need_entropy),
        chunk_bytes=chunk_bytes,
        memory_budget=None if memory_budget is None else _check_real("memory_budget", memory_budget, lo=0.0),
        lse_out=bool(lse_out),
    )


def _autocast_dtype(t):
    """The dtype F.linear would compute ``t`` in: the autocast dtype if autocast is on for t's
    device and t is a floating tensor other than float64 (autocast leaves float64 alone)."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return None if t is None else t.dtype
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


def _autocast(hidden, weight, bias):
    """Cast as F.linear would under torch.autocast; then (as F.linear) demand one dtype."""
    hidden, weight = hidden.to(_autocast_dtype(hidden)), weight.to(_autocast_dtype(weight))
    bias = None if bias is None else bias.to(_autocast_dtype(bias))
    if weight.dtype != hidden.dtype:
        _fail("weight dtype", f"hidden's dtype {hidden.dtype} (or use torch.autocast)", weight.dtype)
    elif bias is not None and bias.dtype != hidden.dtype:
        _fail("bias dtype", f"hidden's dtype {hidden.dtype}", bias.dtype)
    return hidden, weight, bias


def _check_tensors(hidden, weight, targets, bias, token_weights, shift, tname="targets"):
    # tname: the user's name of the targets argument (linear_log_probs calls it "tokens")
    for name, t in (("hidden", hidden), ("weight", weight), (tname, targets)):
        if not isinstance(t, torch.Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__)
    if hidden.dtype not in _FLOAT_DTYPES:
        _fail("hidden dtype", "float16, bfloat16, float32 or float64", hidden.dtype)
    if hidden.dim() < (2 if shift else 1):
        _fail("hidden", "shape (*, T, D) with shift=True" if shift else "shape (*, D)", tuple(hidden.shape))
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        _fail("weight", f"shape (V, {hidden.shape[-1]}) with V >= 1", tuple(weight.shape))
    if targets.dtype not in (torch.int64, torch.int32):
        _fail(f"{tname} dtype", "torch.int64 or torch.int32", targets.dtype)
    if targets.shape != hidden.shape[:-1]:
        _fail(tname, f"shape {tuple(hidden.shape[:-1])} (hidden's without D)", tuple(targets.shape))
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        _fail("bias", f"None or a tensor of shape ({weight.shape[0]},)",
              tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__)
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor) or not token_weights.is_floating_point():
            _fail("token_weights", "None or a float tensor", getattr(token_weights, "dtype", type(token_weights)))
        if token_weights.shape != targets.shape:
            _fail("token_weights", f"{tname}' shape {tuple(targets.shape)}", tuple(token_weights.shape))
    for name, t in (("weight", weight), (tname, targets), ("bias", bias), ("token_weights", token_weights)):
        if t is not None and t.device != hidden.device:
            _fail(f"{name} device", f"hidden's device {hidden.device}", t.device)


def _fail_targets(targets, vocab, ignore_index, tname="targets"):
    first = targets[(targets.clamp(0, vocab - 1) != targets) & (targets != ignore_index)][0].item()
    _fail(tname, f"class indices in [0, {vocab}) or ignore_index={ignore_index}", f"{first}")


def _check_flag(bad, targets, vocab, ignore_index, defer=False, tname="targets"):
    """Raise when the one-element 0/1 tensor ``bad`` is set; with ``defer`` and a CUDA flag,
    return a function that raises instead, reading the flag (copied to pinned memory now) once
    the caller has queued its kernels: no host sync that idles the GPU during the call's Python
    (0.3-0.6 ms on the H200). Kernels treat such targets as ignored."""
    if defer and bad.is_cuda:
        flag = torch.empty((), dtype=bad.dtype, pin_memory=True)
        flag.copy_(bad.reshape(()), non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def check():
            done.synchronize()  # waits for the flag only, not for the kernels queued after it
            if flag.item():
                _fail_targets(targets, vocab, ignore_index, tname)
        return check
    if bool(bad.reshape(())):
        _fail_targets(targets, vocab, ignore_index, tname)
    return None


def _check_targets(targets, vocab, ignore_index, defer=False, tname="targets"):
    """Raise for a target outside [0, V) that is not ignore_index (see _check_flag for
    ``defer``; under torch.compile an async assert)."""
    bad = (targets.clamp(0, vocab - 1) != targets) & (targets != ignore_index)
    if torch.compiler.is_compiling():  # (before numel(): no guard on the token count)
        torch._assert_async(~bad.any(), f"cutce: {tname} outside [0, V) that are not ignore_index")
        return None
    return (_check_flag(bad.any(), targets, vocab, ignore_index, defer, tname) if targets.numel()
            else None)


def choose_backend(impl, hidden, kind="loss", teacher=None, float16=True) -> str:
    """The planner's backend ("torch" | "triton") for a validated call (see
    :func:`cutce.engine.planner.choose_backend`); a broken Triton install warns once."""
    if impl not in IMPLS:
        _fail("impl", f"one of {IMPLS}", repr(impl))
    name, reason = planner.choose_backend(
        impl, hidden.is_cuda, lambda: backends.triton_reason(hidden, kind, teacher, float16))
    backends.fallback_notice(reason)
    return name


def _fused_loss(be, name, problem, opts):
    """The backend's fused function when the plan fuses this call, else None. Under
    torch.compile only static facts decide (never N, so that compile does not specialize on it)
    and the op plans again at run time, possibly running the recompute kernels inside; in eager
    code a call the plan would not fuse keeps the recompute strategy's own backward (gradients
    allocated in the backward, not held from the forward on)."""
    if not planner.may_fuse(problem, name, label_smoothing=opts.label_smoothing > 0):
        return None
    if not torch.compiler.is_compiling() and not planner.plan(problem, name).fused:
        return None
    return be.fused_loss


def prepare(hidden, weight, targets, bias, token_weights, shift, ignore_index, vocab=None,
            check_targets=True, tname="targets"):
    """Validate tensors, apply autocast and shift, flatten to (N, D). Returns the flat tensors,
    the output shape (targets' shape after shift) and the targets' range check to run once the
    kernels are queued (None when none is pending, see _check_flag). ``vocab``: the global V
    that targets are checked against when ``weight`` is one rank's vocabulary slice (default:
    weight's rows). ``check_targets=False``: the caller checks the flat targets itself.
    ``tname``: the user's name of the targets argument, for error messages."""
    _check_tensors(hidden, weight, targets, bias, token_weights, shift, tname)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    if shift:
        hidden, targets = hidden[..., :-1, :], targets[..., 1:]
        token_weights = None if token_weights is None else token_weights[..., 1:]
    check = None
    if check_targets:
        check = _check_targets(targets, weight.shape[0] if vocab is None else vocab, ignore_index,
                               defer=True, tname=tname)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    w1 = None if token_weights is None else token_weights.reshape(-1)
    return h2, weight, bias, targets.reshape(-1).long(), w1, targets.shape, check


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None, logit_scale: float = 1.0,
    token_weights: Tensor | None = None, shift: bool = False, return_lse: bool = False,
    filter_eps: float | str | None = None, impl: str = "auto", memory_budget: float | None = None,
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
            fraction of the gradients' size (None: 2.0 on the Triton path, 1.0 on the torch
            path, whose chunks gain nothing from more). Within it, a call whose gradient is
            a scalar's (reduction "mean"/"sum", no return_lse, no filter_eps, no vocab_group;
            on the Triton path also no label_smoothing and bfloat16/float32 inputs)
            computes each token chunk's logits once and forms dE and dC right away (three
            N x D x V products instead of four: faster, same exactness); below what that needs,
            or at 0, the backward recomputes the logits (memory: gradients + ~8%). A fused
            call's gradients are handed out once: backpropagating twice through the same loss
            (retain_graph) raises; use memory_budget=0 for that. The recompute backward (Triton
            path, more than one token chunk) sums dC in float32 when the budget covers a
            V x D float32 buffer (the default always does), else rounds it per token chunk. See
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
        _fail("return_lse", "a bool", repr(return_lse))
    opts = make_options(_autocast_dtype(hidden) if isinstance(hidden, torch.Tensor) else torch.float32,
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
    if isinstance(call.parts, _Fused):
        return call.parts.total
    out = loss.loss_from_parts(call.parts, call.targets, call.token_weights, opts, call.vocab,
                               call.class_weight)
    out = out.reshape(call.out_shape) if opts.reduction == "none" else out
    return (out, call.parts[0].reshape(call.out_shape)) if return_lse else out


class _Fused(NamedTuple):
    total: torch.Tensor  # the reduced loss, from the fused strategy


class Call(NamedTuple):
    """What :func:`compute_parts` returns: the parts (or ``_Fused``), flat targets and token
    weights, the output shape, the global V and the class weights (None without)."""

    parts: object
    targets: torch.Tensor
    token_weights: torch.Tensor | None
    out_shape: torch.Size
    vocab: int
    class_weight: loss.ClassWeights | None


def _class_weights(class_weight, t1, weight, vs, opts, dtype):
    """Validate class_weight (this rank's slice under a vocabulary split) and derive its terms."""
    local_v = weight.shape[0]
    if not isinstance(class_weight, torch.Tensor) or not class_weight.is_floating_point():
        _fail("class_weight", "None or a float tensor", getattr(class_weight, "dtype", type(class_weight)))
    if class_weight.shape != (local_v,):
        what = "this rank's vocabulary slice" if vs is not None else "weight's rows"
        _fail("class_weight", f"shape ({local_v},) ({what})", tuple(class_weight.shape))
    if class_weight.device != weight.device:
        _fail("class_weight device", f"weight's device {weight.device}", class_weight.device)
    if class_weight.requires_grad:
        _fail("class_weight", "a tensor that does not require grad (it is not differentiated)",
              "requires_grad=True")
    return loss.class_weight_terms(class_weight.detach().to(dtype), t1, opts.ignore_index, vs)


def compute_parts(hidden, weight, targets, bias, token_weights, shift, impl, opts: Options,
                  vocab_group=None, vocab_start=None, reduce_hidden_grad=True, return_lse=False,
                  fusable=False, class_weight=None, tname="targets") -> Call:
    """Validate, flatten and dispatch: the backend contract's parts for a public function.
    ``tname``: the user's name of the targets argument, for error messages.

    With ``fusable`` (the caller reduces the loss to a scalar, see linear_cross_entropy) and a
    plan that fuses, parts is a ``_Fused`` holding the reduced loss instead.
    """
    # Vocabulary parallelism (vocab_group, DTensor weight): vs locates this rank's slice (None if
    # not split). Collective when split, so every rank must make this call; it checks that every
    # rank passed the same options (opts, shift, return_lse, grad mode, ...).
    hidden, weight, bias, targets, token_weights, vs = distributed.resolve_vocab_parallel(
        hidden, weight, bias, targets, token_weights, vocab_group, vocab_start, reduce_hidden_grad,
        opts=opts, shift=shift, return_lse=return_lse, class_weight=class_weight, tname=tname)
    h2, weight, bias, t1, w1, out_shape, _ = prepare(
        hidden, weight, targets, bias, token_weights, shift, opts.ignore_index,
        vocab=None if vs is None else vs.vocab, check_targets=False, tname=tname)
    vocab = weight.shape[0] if vs is None else vs.vocab
    cdt = torch.float64 if h2.dtype == torch.float64 else torch.float32
    cw = None if class_weight is None else _class_weights(class_weight, t1, weight, vs, opts, cdt)
    zsum_cw = cw.local if cw is not None and opts.need_zsum else None  # only smoothing reads it
    name = choose_backend(impl, h2)
    be = backends.load(name, "loss")
    need_h, need_w = (t.requires_grad and torch.is_grad_enabled() for t in (h2, weight))
    problem = Problem(h2.shape[0], weight.shape[0], h2.shape[1], h2.dtype, need_h, need_w,
                      reduced=fusable and vs is None, memory_budget=opts.memory_budget,
                      chunk_bytes=opts.chunk_bytes)
    fused = _fused_loss(be, name, problem, opts)
    if (fused is not None and name == "triton" and cw is None and not opts.label_smoothing
            and not torch.compiler.is_compiling()):
        # eager Triton training call: one launch for the targets check's flag and the row
        # coefficients (under torch.compile the torch ops below stay, for the compiler to fuse)
        from .backends.triton import rows
        coef, bad = rows.row_coefs(t1, w1, vocab, opts.ignore_index, opts.z_loss,
                                   opts.reduction == "mean")
        check = _check_flag(bad, t1, vocab, opts.ignore_index, defer=True, tname=tname)
    else:
        check = _check_targets(t1, vocab, opts.ignore_index, defer=True, tname=tname)
        coef = None if fused is None else loss.row_coefs(t1, w1, opts, cdt, cw, vocab)
    if fused is not None:
        parts = _Fused(fused(h2, weight, bias, t1, coef, opts, class_weight=zsum_cw)[0])
    elif vs is None:
        parts = be.linear_lse_parts(h2, weight, bias, t1, opts, class_weight=zsum_cw)
    else:
        parts = distributed.vocab_parallel_parts(be.linear_lse_parts, h2, weight, bias, t1, opts,
                                                 vs, class_weight=zsum_cw)
    if check is not None:
        check()
    return Call(parts, t1, w1, out_shape, vocab, cw)
