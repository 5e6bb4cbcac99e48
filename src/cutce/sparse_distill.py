"""Distillation from a stored sparse teacher (its top-K ids and log-probs per token), without the
student's logits.

Per token, with p_j = exp(teacher_logprobs_j) at the K ids, P = sum_j p_j, s = the student's
logits / T and lse = logsumexp(s) over the whole vocabulary, the forward KL over the K ids is::

    D = sum_j p_j log p_j - sum_j p_j s_j + P lse

Its only full-vocabulary term, P lse, is a weighted cross-entropy, and - sum_j p_j s_j is that
pass's target term with the K ids as K weighted targets. A reduced "drop" loss on one device is
exactly one fused cross-entropy pass with soft targets (:func:`cutce.api.compute_parts`'s
``soft``): the ids cost O(N K) beside it. Otherwise the pass runs as ``linear_cross_entropy``
(any one of the K ids as its target gives P (lse - s_t); both backends, vocabulary parallelism)
and the rest comes from the student's K logits (:mod:`cutce.backends.pytorch.gather`,
O(N K D)). So a call costs about one cross-entropy. The CE term on ``targets`` joins the same
pass when T = 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import api
from .backends.pytorch.gather import gather_logits
from .engine.loss import token_coefs
from .parallel import sparse as sparse_parallel
from .parallel import split
from .validate import (autocast_dtype, check_ce_weight, check_impl, check_real, fail,
                       make_options)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

TAILS = ("drop", "renormalize", "bucket")


def linear_sparse_distillation_loss(
    hidden: Tensor, weight: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
    targets: Tensor | None = None, *, bias: Tensor | None = None, tail: str = "drop",
    temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
    ignore_index: int = -100, ce_weight: float = 0.0, reduction: str = "mean",
    shift: bool = False, token_weights: Tensor | None = None, impl: str = "auto",
    memory_budget: float | str | None = None, vocab_group: ProcessGroup | None = None,
    vocab_start: int | None = None, reduce_hidden_grad: bool = True,
) -> Tensor:
    """Forward KL from a stored sparse teacher (top-K ids and log-probs) to a linear student head.

    Args:
        hidden: (*, D) float16/bfloat16/float32/float64 student hidden states.
        weight: (V, D) student classifier, hidden's dtype (outside autocast). bias: (V,) or None.
        teacher_ids: (*, K) int64/int32: per token, K distinct class ids in [0, V) where the
            teacher's log-probs were kept (its top-K); ``ignore_index`` pads a shorter list. A
            token whose list is all padding is ignored.
        teacher_logprobs: (*, K) float: the teacher's log-probabilities at those ids (log of
            its softmax at temperature T over the whole vocabulary, so their exp sums to at most
            1); ignored at padding (any value there). -inf is a probability of 0.
        targets: (*) int64/int32 class ids in [0, V) or ``ignore_index`` (a token whose target
            is ``ignore_index`` is ignored), or None (tokens are ignored only by their padding;
            no CE term possible).
        tail: what becomes of the teacher's mass outside the K ids, 1 - P (P = sum_j p_j):
            "drop" (default): KL terms at the K ids only, q the student's softmax over the whole
            vocabulary. "renormalize": both distributions renormalized over the K ids (the
            student needs only its K logits: no full-vocabulary pass unless ce_weight > 0).
            "bucket": the tail is one more class for both, 1 - P against 1 - sum_j q_j; its
            gradient needs each token's log-sum-exp, so it takes the loss's per-token path
            (``return_lse``, whose backward recomputes the logits: ~4 N x D x V products
            instead of 3).
        temperature: T > 0, divides the student's logits (after softcap) for the divergence.
            No T^2 factor (as :func:`cutce.linear_distillation_loss`: scale it yourself).
        softcap: None or > 0: ``softcap * tanh(z / softcap)``. logit_scale: > 0, multiplies the
            logits before softcap (as the loss's).
        ignore_index: padding in teacher_ids and the ignored target.
        ce_weight: in [0, 1]: loss = (1 - ce_weight) D + ce_weight CE(student at T = 1,
            targets). Needs targets.
        reduction: "mean" (over the tokens that count: weighted by token_weights), "sum" or
            "none".
        shift: next-token layout: ``hidden[..., :-1, :]``, ``teacher_ids[..., :-1, :]`` and
            ``teacher_logprobs[..., :-1, :]`` (the teacher's prediction stored at the position
            that makes it, as the hidden states) against ``targets[..., 1:]`` and
            ``token_weights[..., 1:]``. A 2-D input (T, D) is one sequence, a 3-D batch
            (B, T, D) is shifted per row.
        token_weights: (*) float per-token weights w_i (shaped and shifted as targets), or None.
        impl: "auto" | "torch" | "triton": the backend of the cross-entropy pass (as
            :func:`cutce.linear_cross_entropy`'s); the K logits are gathered with torch ops on
            any device.
        memory_budget: the cross-entropy pass's (see :func:`cutce.linear_cross_entropy`).
            Within it a "mean"/"sum" call with tail "drop" (or "renormalize" with ce_weight > 0)
            takes the fused three-GEMM strategy, whose backward runs once (differentiable token
            weights or teacher log-probs take the recompute strategy); "none" and "bucket" take
            the per-token path. Apart from the budget, the K logits' backward forms their
            weight gradient as a V x D float32 tensor (for 16-bit weights: twice the weight's
            size) before adding it to the pass's.
        vocab_group, vocab_start, reduce_hidden_grad: vocabulary parallelism, as
            :func:`cutce.linear_cross_entropy`'s (a Shard(0) DTensor weight splits without
            vocab_group). teacher_ids and targets hold global ids; hidden, teacher_ids,
            teacher_logprobs, targets and token_weights are the same on every rank. Each rank
            computes the logits at the ids it owns; one all-gather of N x K values sums them.

    Returns:
        float32 tensor (float64 for float64 hidden): a scalar, or the per-token losses in
        hidden's leading shape after shift for "none", differentiable w.r.t. hidden, weight,
        bias, token_weights and teacher_logprobs. "mean" with no token that counts gives 0 with
        zero gradients; NaN when tokens count but their weights sum to 0. Equal, up to
        rounding, to::

            if shift: h, ids, lp = h[..., :-1, :], ids[..., :-1, :], lp[..., :-1, :]
                      targets, w = targets[..., 1:], w[..., 1:]
            z = logit_scale * (h @ W.T + b);  z = softcap * tanh(z / softcap) if softcap
            log_q = log_softmax(z / T, -1)                              # float32
            pad = ids == ignore_index
            lq = log_q.gather(-1, ids.masked_fill(pad, 0))
            p = lp.exp().masked_fill(pad, 0);  P = p.sum(-1)
            "drop":        D = (p * (lp - lq)).sum(-1)                  # p_j = 0 terms give 0
            "renormalize": lq = lq - logsumexp(lq.masked_fill(pad, -inf), -1, keepdim=True)
                           D = (p / P * (lp - log(P) - lq)).sum(-1)
            "bucket":      R = (1 - P).clamp(min=0);  Q = lq.exp().masked_fill(pad, 0).sum(-1)
                           D = (p * (lp - lq)).sum(-1) + R * log(R / (1 - Q))   # 0 where R = 0
            loss = (1 - ce_weight) * D + ce_weight * F.cross_entropy(z, targets, reduction="none")
            valid = (~pad).any(-1) & (targets != ignore_index)          # w: token_weights or 1
            loss = w * loss where valid else 0
            "mean": loss.sum() / w[valid].sum();  "sum": loss.sum();  "none": loss

        No N x V tensor exists: the full-vocabulary part is a cross-entropy pass (token
        weights P, logit scale and softcap divided by T). A reduced "drop" on one device,
        eager, with no gradient for teacher_logprobs or token_weights, takes the K ids as the
        fused pass's soft targets. Otherwise the K logits are gathered in token chunks, and
        their backward is an ``embedding_bag`` of weight rows and its backward (sorted sums,
        no atomics: bitwise reproducible).
    """
    ids, lp = _check_teacher(hidden, teacher_ids, teacher_logprobs, shift)
    temperature = check_real("temperature", temperature, lo=0.0, lo_open=True)
    ce_weight = check_ce_weight(ce_weight, targets)
    if tail not in TAILS:
        fail("tail", f"one of {TAILS}", repr(tail))
    check_impl(impl)
    if not isinstance(shift, bool):
        fail("shift", "a bool", repr(shift))
    opts = make_options(torch.float32, ignore_index=ignore_index, reduction=reduction,
                        softcap=softcap, logit_scale=logit_scale, temperature=temperature,
                        memory_budget=memory_budget)
    opts = dataclasses.replace(opts, ce_weight=ce_weight)
    given = targets is not None
    if not given:  # zeros pass the helpers' checks; nothing is ignored by them
        targets = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
    hidden, weight, bias, targets, token_weights, vs, _ = split.resolve(
        hidden, weight, bias, targets, token_weights, vocab_group, vocab_start, reduce_hidden_grad,
        opts=opts, shift=shift, facts={"tail": tail, "targets given": given,
                                       "teacher_ids K": ids.shape[-1], "impl": impl})
    h2, weight, bias, t1, w1, out_shape, check = api.prepare(
        hidden, weight, targets, bias, token_weights, shift, ignore_index,
        None if vs is None else vs.vocab, given)
    api.choose_backend(impl, h2)  # an explicit impl that cannot run raises, passes or not
    k = ids.shape[-1]
    ids, lp = ids.reshape(-1, k).long(), lp.reshape(-1, k)
    cdt = torch.float64 if h2.dtype == torch.float64 else torch.float32
    vocab = weight.shape[0] if vs is None else vs.vocab
    check_ids = _check_ids(ids, vocab, ignore_index)
    # ids (and targets) out of range count as padding (ignored) until their deferred checks
    # raise: no out-of-bounds index reaches the device
    cand = (ids != ignore_index) & (ids >= 0) & (ids < vocab)
    valid = cand.any(dim=1) & (t1 != ignore_index)
    folds = _folds(tail, ce_weight, vs, opts, lp, w1)
    # the teacher: a -inf log-prob is p = 0 (kept out of products, whose gradients it would NaN)
    lp = lp.to(cdt)
    live = cand & (lp != -math.inf)
    lp = torch.where(live, lp, 0.0)
    p = torch.where(live, lp.exp(), 0.0)
    if folds:
        out = _drop_total(h2, weight, bias, ids, lp, p, live, cand, valid, t1, w1, opts, vocab,
                          impl, memory_budget)
        for pending in (check, check_ids):
            if pending is not None:
                pending()
        return out

    # the student's logits at the K ids (and at the target, for the CE term), after softcap
    cols = torch.where(cand, ids, -1)
    if ce_weight > 0.0:
        owned = valid & (t1 >= 0) & (t1 < vocab)
        cols = torch.cat([cols, torch.where(owned, t1, -1)[:, None]], dim=1)
    if vs is None:
        z = gather_logits(h2, weight, bias, cols, opts.logit_scale)
    else:
        z = sparse_parallel.vocab_parallel_gather(h2, weight, bias, cols, opts.logit_scale, vs)
    if opts.softcap:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    s = z[:, :k] / temperature
    z_ce = z[:, k] if ce_weight > 0.0 else None

    mass = p.sum(dim=1)
    div = ce_weight < 1.0
    full_lse = div and tail != "renormalize"  # D holds P lse over the whole vocabulary
    d_rest = _rest(p, lp, s, mass, cand, valid, tail) if div else None
    # any of a token's ids serves as the passes' target: its first
    col = cand.to(torch.uint8).argmax(dim=1, keepdim=True)
    first = torch.where(valid, ids.gather(1, col)[:, 0], ignore_index)
    s_first = s.gather(1, col)[:, 0]
    t_ce = torch.where(valid, t1, ignore_index)
    ce_kw = dict(bias=bias, ignore_index=ignore_index, impl=impl, memory_budget=memory_budget,
                 vocab_group=None if vs is None else vs.group,
                 vocab_start=None if vs is None else vs.start,
                 reduce_hidden_grad=True if vs is None else vs.reduce_hidden_grad)

    def pass_at(t, token_w=None, target=None):
        """The cross-entropy pass at temperature t: sum_i w_i (lse_i - z_i[target_i] / t), or
        with token_w None the per-token lse."""
        kw = dict(ce_kw, logit_scale=opts.logit_scale / t,
                  softcap=None if opts.softcap is None else opts.softcap / t)
        if token_w is None:
            return api.linear_cross_entropy(h2, weight, target, reduction="none", return_lse=True,
                                            **kw)[1]
        return api.linear_cross_entropy(h2, weight, target, token_weights=token_w,
                                        reduction="sum", **kw)

    merged = temperature == 1.0  # one pass serves D's lse and the CE's
    if opts.reduction != "none" and tail != "bucket":
        coef = token_coefs(valid, w1, opts.reduction, cdt)
        total = (coef * torch.where(valid, _masked_rest(d_rest, z_ce, ce_weight), 0.0)).sum()
        a_t = coef * (1.0 - ce_weight) * mass if full_lse else None
        a_1 = coef * ce_weight if ce_weight > 0.0 else None
        if merged and a_t is not None and a_1 is not None:
            a_t, a_1 = None, a_t + a_1  # the CE's target and logit carry both
        for a, t, target, logit in ((a_t, temperature, first, s_first), (a_1, 1.0, t_ce, z_ce)):
            if a is not None:
                a = torch.where(valid, a, 0.0)
                total = total + pass_at(t, a, target) + (a * torch.where(valid, logit, 0.0)).sum()
        out = total
    else:
        if full_lse and ce_weight > 0.0 and merged:
            lse_t = lse_1 = pass_at(1.0, target=t_ce)
        else:
            lse_t = pass_at(temperature, target=first) if full_lse else None
            lse_1 = pass_at(1.0, target=t_ce) if ce_weight > 0.0 else None
        rows = torch.zeros_like(mass)
        if div:
            d = d_rest + mass * lse_t if full_lse else d_rest
            if tail == "bucket":
                d = d + _bucket(mass, s, cand, valid, lse_t)
            rows = rows + (1.0 - ce_weight) * d
        if ce_weight > 0.0:
            rows = rows + ce_weight * (lse_1 - z_ce)
        rows = torch.where(valid, rows, 0.0)
        if opts.reduction == "none":
            out = rows if w1 is None else torch.where(valid, rows * w1.to(cdt), 0.0)
            out = out.reshape(out_shape)
        else:
            out = (rows * token_coefs(valid, w1, opts.reduction, cdt)).sum()
    for pending in (check, check_ids):
        if pending is not None:
            pending()
    return out


def _folds(tail, ce_weight, vs, opts, lp, w1):
    """Whether the call takes :func:`_drop_total`: a reduced "drop" divergence on one device,
    eager, with no gradient wanted for the teacher's log-probs or the token weights (the fused
    pass does not differentiate its coefficients)."""
    grads = torch.is_grad_enabled() and (lp.requires_grad or (w1 is not None and w1.requires_grad))
    return (tail == "drop" and ce_weight < 1.0 and vs is None and opts.reduction != "none"
            and not grads and not torch.compiler.is_compiling())


def _drop_total(h2, weight, bias, ids, lp, p, live, cand, valid, t1, w1, opts, vocab, impl,
                budget):
    """The reduced "drop" loss as one cross-entropy pass with the K ids as soft targets:

        sum_i c_i [(1 - ce) (sum_j p_ij log p_ij + P_i lse_i - sum_j p_ij s_ij) + ce CE_i]

    (c_i: the row's weight in the reduction) is the pass's sum_i k0_i lse_i - sum_ij a_ij s_ij
    with k0 = c (1 - ce) P and a = c (1 - ce) p, plus a term of the teacher alone. The fused
    strategy forms the soft targets' gradient inside its own products
    (:mod:`cutce.backends.triton.fused_soft`), so the K logits need no gather of their own. At
    T = 1 the CE joins the same pass as one more soft target."""
    cdt, t = lp.dtype, opts.temperature
    # the pass's target only anchors its exponentials (its reference logit): the teacher's most
    # likely id, which the student's logits put near their top, so that few rows need a refill
    col = torch.where(cand, torch.where(live, lp, -1e30), -math.inf).argmax(dim=1, keepdim=True)
    anchor = torch.where(valid, ids.gather(1, col)[:, 0], opts.ignore_index)
    coef = token_coefs(valid, w1, opts.reduction, cdt)
    c_div = torch.where(valid, coef * (1.0 - opts.ce_weight), 0.0)
    total = (c_div * (p * lp).sum(dim=1)).sum()
    soft_ids, a, k0 = torch.where(cand, ids, -1), c_div[:, None] * p, c_div * p.sum(dim=1)
    ce_kw = dict(bias=bias, ignore_index=opts.ignore_index, impl=impl, memory_budget=budget)
    if opts.ce_weight > 0.0:
        c_ce = torch.where(valid, coef * opts.ce_weight, 0.0)
        if t == 1.0:  # the target as one more soft target, or more weight on its own id
            in_range = valid & (t1 >= 0) & (t1 < vocab)
            hit = (soft_ids == t1[:, None]) & in_range[:, None]
            extra = in_range & ~hit.any(dim=1)
            soft_ids = torch.cat([soft_ids, torch.where(extra, t1, -1)[:, None]], dim=1)
            a = torch.cat([a + hit * c_ce[:, None], torch.where(extra, c_ce, 0.0)[:, None]], dim=1)
            k0 = k0 + c_ce
        else:
            t_ce = torch.where(valid, t1, opts.ignore_index)
            total = total + api.linear_cross_entropy(h2, weight, t_ce, token_weights=c_ce,
                                                     reduction="sum", softcap=opts.softcap,
                                                     logit_scale=opts.logit_scale, **ce_kw)
    softcap = None if opts.softcap is None else opts.softcap / t
    pass_opts = make_options(autocast_dtype(h2), ignore_index=opts.ignore_index, reduction="sum",
                             softcap=softcap, logit_scale=opts.logit_scale / t,
                             memory_budget=budget)
    call = api.compute_parts(h2, weight, anchor, bias, k0, False, impl, pass_opts, fusable=True,
                             soft=(soft_ids, a))
    if isinstance(call.parts, api.Fused):
        total = total + call.parts.total
    else:
        total = total + (k0 * torch.where(valid, call.parts.lse, 0.0)).sum()
    if not call.soft_applied:  # the soft targets' term, by autograd through the K logits
        z = gather_logits(h2, weight, bias, soft_ids, pass_opts.logit_scale)
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        total = total - (a * z).sum()
    return total


def _rest(p, lp, s, mass, cand, valid, tail):
    """D without its P lse term: sum p log p - sum p s; with "renormalize" all of D (over the
    K ids: sum p~ (log p~ - s) + logsumexp_K s, p~ = p / P)."""
    neg_ent, cross = (p * lp).sum(dim=1), (p * s).sum(dim=1)
    if tail != "renormalize":
        return neg_ent - cross
    has = mass > 0
    m = torch.where(has, mass, 1.0)
    return (neg_ent - cross) / m - torch.log(m) + has.to(m.dtype) * _lse_k(s, cand, valid)


def _lse_k(s, cand, valid):
    """logsumexp of the student's logits over each token's ids (finite rows everywhere: a row
    without ids is all 0, masked later, so that no -inf reaches a gradient)."""
    sk = torch.where(cand, s, -math.inf)
    return torch.logsumexp(torch.where(valid[:, None], sk, 0.0), dim=1)


def _bucket(mass, s, cand, valid, lse):
    """R log(R / (1 - Q)), R = 1 - P clamped at 0, Q = exp(lse_K - lse) the student's mass on
    the ids; 0 where R = 0 (and no NaN in any gradient there)."""
    r = (1.0 - mass).clamp(min=0.0)
    has = r > 0
    x = torch.where(has, (_lse_k(s, cand, valid) - lse).clamp(max=0.0), -1.0)
    # log(1 - e^x), stable at both ends
    log1m = torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return torch.where(has, r * (torch.log(torch.where(has, r, 1.0)) - log1m), 0.0)


def _masked_rest(d_rest, z_ce, ce_weight):
    """The reduced loss's per-token terms beyond the passes' lse: (1 - c) D_rest - c z[target]."""
    out = 0.0 if d_rest is None else (1.0 - ce_weight) * d_rest
    return out - ce_weight * z_ce if ce_weight > 0.0 else out


def _check_teacher(hidden, ids, lp, shift):
    """Types and shapes of the teacher's tensors against hidden's; returns them after shift."""
    for name, t in (("hidden", hidden), ("teacher_ids", ids), ("teacher_logprobs", lp)):
        if not isinstance(t, torch.Tensor):
            fail(name, "a torch.Tensor", type(t).__name__)
    if ids.dtype not in (torch.int64, torch.int32):
        fail("teacher_ids dtype", "torch.int64 or torch.int32", ids.dtype)
    lead = tuple(hidden.shape[:-1])
    if ids.dim() != hidden.dim() or tuple(ids.shape[:-1]) != lead or ids.shape[-1] < 1:
        fail("teacher_ids", f"shape {lead} + (K,) with K >= 1 (hidden's without D)",
             tuple(ids.shape))
    if not lp.is_floating_point():
        fail("teacher_logprobs dtype", "a float dtype", lp.dtype)
    if lp.shape != ids.shape:
        fail("teacher_logprobs", f"teacher_ids' shape {tuple(ids.shape)}", tuple(lp.shape))
    for name, t in (("teacher_ids", ids), ("teacher_logprobs", lp)):
        if t.device != hidden.device:
            fail(f"{name} device", f"hidden's device {hidden.device}", t.device)
    if shift and ids.dim() >= 2:
        ids, lp = ids[..., :-1, :], lp[..., :-1, :]
    return ids, lp


def _check_ids(ids, vocab, ignore_index):
    """The (N, K) ids' check: in [0, V) or ignore_index, distinct per token. Read after the
    kernels are queued (a returned function) on CUDA, at once elsewhere, as the targets'."""
    if ids.numel() == 0:
        return None
    out = ((ids < 0) | (ids >= vocab)) & (ids != ignore_index)
    srt = ids.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] != ignore_index)
    flags = torch.stack([out.any(), dup.any()])
    if torch.compiler.is_compiling():
        torch._assert_async(~flags.any(), "cutce: teacher_ids outside [0, V) or repeated")
        return None

    def raise_bad():
        if bool(flags[0]):
            fail("teacher_ids", f"class ids in [0, {vocab}) or ignore_index={ignore_index}",
                 f"{ids[out][0].item()}")
        row = dup.any(dim=1).nonzero()[0, 0].item()
        fail("teacher_ids", f"distinct ids in each token's list (ignore_index={ignore_index} "
             "pads)", f"{ids[row].tolist()} at flat token {row}")

    if flags.is_cuda:
        pinned = torch.empty(2, dtype=torch.bool, pin_memory=True)
        pinned.copy_(flags, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def check():
            done.synchronize()
            if pinned.any():
                raise_bad()
        return check
    if bool(flags.any()):
        raise_bad()
    return None
