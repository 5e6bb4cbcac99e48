"""Per-token log-probabilities and entropy (RL fine-tuning) on the same backends as the loss.

Validation and dispatch are api.py's; this module only turns the backend contract's parts into
log p(token) = zt - lse and H = lse - sum_j p_j z_j (and, with ``return_stats``, the per-token
metrics of :class:`TokenStats`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from . import api
from .truncated_log_probs import truncated_log_probs
from .validate import autocast_dtype, fail, make_options

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class TokenStats(NamedTuple):
    """What :func:`linear_log_probs` returns with ``return_stats=True``: per token, float32
    (float64 for float64 inputs; ``is_top1`` bool) with tokens' shape after shift, 0 (False) at
    ignored positions. ``log_probs`` and ``entropy`` are differentiable, the other three are
    metrics (detached). See :func:`linear_log_probs` for the exact expressions."""

    log_probs: Tensor
    entropy: Tensor
    is_top1: Tensor
    mean_logits: Tensor
    log_sum_sq_probs: Tensor


def linear_log_probs(
    hidden: Tensor, weight: Tensor, tokens: Tensor, bias: Tensor | None = None, *,
    temperature: float | Tensor = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
    shift: bool = False, ignore_index: int = -100, return_entropy: bool = False,
    return_stats: bool = False, top_k: int | None = None, top_p: float | None = None,
    min_p: float | None = None,
    impl: str = "auto", vocab_group: ProcessGroup | None = None, vocab_start: int | None = None,
    reduce_hidden_grad: bool = True, memory_budget: float | str | None = None,
) -> Tensor | tuple[Tensor, Tensor] | TokenStats:
    """Log-probability of given tokens (and the entropy) under a linear head, without logits.

    Args:
        hidden: (*, D) float16/bfloat16/float32 (float64 on the torch path) hidden states.
        weight: (V, D) classifier weight; bias: (V,) or None.
        tokens: (*) int64/int32 token ids in [0, V) or ``ignore_index``.
        temperature: > 0, divides the logits after softcap (as samplers do). Either a float, or
            a float tensor T of tokens' shape (any float dtype, tokens' device, not requiring
            grad): per-token temperatures, e.g. of rollouts sampled at mixed temperatures; with
            ``shift`` it is shifted like tokens (``T[..., 1:]``: the temperature at position
            t + 1 scores the token at t + 1). Values at ignored positions are not read; the
            others must be finite and > 0 (checked on the device, raised after the kernels
            are queued: no host sync). Not differentiated.
        softcap: None or > 0. logit_scale: > 0, multiplies the logits before softcap.
        shift: ``hidden[..., :-1, :]`` scores ``tokens[..., 1:]``. A 2-D input (T, D) is one
            sequence; a 3-D batch (B, T, D) is shifted per row. Packed sequences (several
            documents in one row) must mark their boundaries: set the token at each sequence's
            first position to ``ignore_index``, so that no position is scored on the next
            sequence's first token (it gets log-prob and entropy 0).
        return_entropy: also return the per-token entropy.
        return_stats: return a :class:`TokenStats` (log-probs, entropy and three per-token
            metrics, computed in the same pass over the vocabulary) instead, whatever
            ``return_entropy`` is.
        top_k: None or an int >= 1. top_p: None or a float in (0, 1]. min_p: None or a float
            in [0, 1]. A sampler's truncation (vLLM's SamplingParams values; top_k=-1 there is
            None here; top_p=1.0 and min_p=0.0 are off): log-probs and entropy are then those
            of the truncated, renormalised distribution (see Returns). Runs on the torch path,
            also for CUDA tensors under impl="auto" (impl="triton" raises); not with
            ``return_stats`` (raises). Under a vocabulary split the ranks agree on each
            token's kept set through collectives on thresholds (no logits move).
        impl: "auto" | "torch" | "triton" (as in :func:`cutce.linear_cross_entropy`).
        vocab_group, vocab_start, reduce_hidden_grad: vocabulary parallelism, as in
            :func:`cutce.linear_cross_entropy` (tokens are global ids).
        memory_budget: extra memory beyond the gradients, as a fraction of the inputs' size
            (hidden and weight), as in :func:`cutce.linear_cross_entropy` (None: 2.0 on the
            Triton path). When the budget holds all N x V logits in the inputs' dtype (Triton
            path, eager calls) the forward keeps them and the backward runs one N x D x V
            product fewer (a second backward recomputes). Otherwise the backward recomputes the
            logits; when it splits the
            tokens into chunks (large N) and the budget covers a float32 V x D buffer, dC is
            summed in float32 across them (exact at any N); ``memory_budget=0`` keeps the
            memory floor (gradients + ~8%) and rounds dC to the weight's dtype once per chunk.

    Returns:
        logp, or (logp, entropy): float32 (float64 for float64 inputs) with tokens' shape after
        shift, 0 at ignored positions, differentiable w.r.t. hidden, weight and bias from any
        upstream gradient of either. Equal, up to rounding, to::

            z = logit_scale * (hidden @ weight.T + bias)           # float32
            z = softcap * tanh(z / softcap) if softcap
            z = z / temperature                      # tensor: z / T[..., None]
            logp = torch.log_softmax(z, -1).gather(-1, tokens[..., None])[..., 0]
            entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)

        With ``return_stats=True``, ``TokenStats(logp, entropy, is_top1, mean_logits,
        log_sum_sq_probs)``, the last three detached (no gradient), over the whole vocabulary
        V (all ranks' under a vocabulary split), with valid = tokens != ignore_index::

            is_top1 = (z.argmax(-1) == tokens) & valid             # bool
            mean_logits = z.mean(-1)
            log_sum_sq_probs = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
                             # = torch.log((z.softmax(-1) ** 2).sum(-1))

        then 0 where not valid. argmax takes the first index of the max, so a token whose logit
        ties with an earlier class's is not a hit (one that ties with a later class's is);
        ties are exact on the torch path and, within float32 rounding of the logits, on the
        Triton path.

        With ``top_k``/``top_p``/``min_p``, in the order of vLLM's v1 sampler (temperature,
        min-p, top-k, top-p), each step on what the previous ones kept::

            keep = z.softmax(-1) >= min_p * z.softmax(-1).amax(-1, keepdim=True)
            keep &= z >= (k-th largest z among keep)                  # ties kept
            q = z.masked_fill(~keep, -inf).softmax(-1)
            keep &= q[z <= z_j].sum() > 1 - top_p for token j          # the largest always kept
            logp = z.masked_fill(~keep, -inf).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
            entropy = -(q * q.log()).sum(-1) over keep                 # q renormalised on keep

        A token outside the kept set gets logp = -inf (``torch.isinf(logp)`` finds them; mask
        them before any arithmetic, e.g. ``torch.where``) and no gradient; the kept set is
        piecewise constant in the logits, so the gradient is that of the log-softmax over it.
        Tokens tied at a top-k or top-p boundary are all kept (vLLM's sort leaves their order
        unspecified; this is the union of every order's kept set).

        No N x V tensor is created in the forward or the backward.
    """
    dtype = autocast_dtype(hidden) if isinstance(hidden, torch.Tensor) else torch.float32
    per_token = temperature if isinstance(temperature, torch.Tensor) else None
    opts = make_options(dtype, ignore_index=ignore_index,
                        reduction="none", softcap=softcap, logit_scale=logit_scale,
                        temperature=1.0 if per_token is not None else temperature,
                        need_entropy=bool(return_entropy) or return_stats is True,
                        memory_budget=memory_budget, need_stats=return_stats is True,
                        top_k=top_k, top_p=top_p, min_p=min_p)
    if not isinstance(return_entropy, bool):
        fail("return_entropy", "a bool", repr(return_entropy))
    if not isinstance(return_stats, bool):
        fail("return_stats", "a bool", repr(return_stats))
    if opts.truncates and per_token is not None:
        fail("temperature", "a float with top_k/top_p/min_p (truncation at per-token "
             "temperatures is not implemented)", "a tensor")
    if opts.truncates:
        return truncated_log_probs(hidden, weight, tokens, bias, shift, impl, opts,
                                   return_entropy, return_stats, vocab_group, vocab_start,
                                   reduce_hidden_grad)
    call = api.compute_parts(hidden, weight, tokens, bias, None, shift, impl, opts, vocab_group,
                             vocab_start, reduce_hidden_grad, tname="tokens", temperature=per_token)
    parts, t1, out_shape = call.parts, call.targets, call.out_shape
    lse, zt, zsum, pz = parts.lse, parts.zt, parts.zsum, parts.pz
    valid = call.valid
    logp = torch.where(valid, zt - lse, 0.0).reshape(out_shape)
    if not (return_entropy or return_stats):
        return logp
    entropy = torch.where(valid, lse - pz, 0.0).reshape(out_shape)
    if not return_stats:
        return logp, entropy
    lse2, amax = parts.lse2, parts.amax  # metrics: no gradient (zsum and lse detached in them too)
    return TokenStats(
        logp, entropy, ((amax == t1) & valid).reshape(out_shape),
        torch.where(valid, zsum.detach() / call.vocab, 0.0).reshape(out_shape),
        torch.where(valid, lse2 - 2.0 * lse.detach(), 0.0).reshape(out_shape))
