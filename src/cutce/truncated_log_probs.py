""":func:`cutce.linear_log_probs` with a sampler's truncation (``top_k``, ``top_p``, ``min_p``).

The truncated distribution runs on the torch backend only (also for CUDA tensors under
``impl="auto"``): validation and flattening are the untruncated path's, then
:func:`cutce.backends.pytorch.truncated.truncated_parts` gives the parts over each token's kept
set, and log p = zt - lse on kept tokens, -inf on the others.

:func:`sampled_log_probs` is the variant for loss code that cannot take ``-inf`` (TRL's trainers,
:mod:`cutce.integrations.trl_sampler`): a token outside its kept set joins it, so its log-prob is
that of the kept set plus the token, renormalised. Where the token is kept, the values are the
same as :func:`cutce.linear_log_probs`'s.
"""

from __future__ import annotations

import torch

from .backends.pytorch import truncated
from .engine.options import Options
from .parallel import split
from .parallel import truncated as vocab_parallel
from .validate import autocast_dtype, check_impl, fail, make_options, prepare

_WHO = "top_k/top_p/min_p"


def truncated_log_probs(hidden, weight, tokens, bias, shift, impl, opts: Options,
                        return_entropy: bool, return_stats: bool, vocab_group=None,
                        vocab_start=None, reduce_hidden_grad=True, keep_tokens=False):
    """logp, or (logp, entropy), of the distribution ``opts.top_k``/``top_p``/``min_p`` truncate
    (see linear_log_probs); with ``keep_tokens`` each token's distribution is its kept set plus
    the token itself."""
    if return_stats:
        fail("return_stats", f"False with {_WHO} (the metrics are the untruncated "
             "distribution's; call without truncation for them)", "True")
    check_impl(impl)
    if impl == "triton":
        fail("impl", f"'auto' or 'torch' for {_WHO} (the Triton kernels do not truncate yet)",
             repr(impl))
    # Collective when split (every rank must call), as for the untruncated call: its
    # fingerprint holds opts, so ranks whose truncation differs raise here, before any
    # collective whose size depends on it.
    hidden, weight, bias, tokens, _, vs, _ = split.resolve(
        hidden, weight, bias, tokens, None, vocab_group, vocab_start, reduce_hidden_grad,
        opts=opts, shift=shift, tname="tokens", facts={"impl": impl})
    h2, weight, bias, t1, _, out_shape, check = prepare(
        hidden, weight, tokens, bias, None, shift, opts.ignore_index,
        vocab=None if vs is None else vs.vocab, tname="tokens")
    if vs is None:
        lse, zt, pz, kept = truncated.truncated_parts(h2, weight, bias, t1, opts)
    else:
        lse, zt, pz, kept = vocab_parallel.vocab_parallel_truncated_parts(h2, weight, bias, t1,
                                                                          opts, vs)
    if check is not None:
        check()
    valid = t1 != opts.ignore_index
    if keep_tokens:
        lse, pz, kept = _join_tokens(lse, zt, pz, kept)
    # where, not arithmetic: a dropped token's -inf carries no gradient into lse or zt
    logp = torch.where(valid, torch.where(kept, zt - lse, float("-inf")), 0.0).reshape(out_shape)
    if not return_entropy:
        return logp
    return logp, torch.where(valid, lse - pz, 0.0).reshape(out_shape)


def _join_tokens(lse, zt, pz, kept):
    """(lse, pz, kept) over each kept set plus its token: a dropped token's exponential is added
    to the kept set's sum, and its logit to the expectation with its share of the mass. The
    gradients follow through lse and zt, so they are those of the log-softmax over that set."""
    joined = torch.logaddexp(lse, zt)
    share = torch.exp(lse - joined)  # the kept set's part of the joined mass
    lse = torch.where(kept, lse, joined)
    pz = torch.where(kept, pz, share * pz + (1.0 - share) * zt)
    return lse, pz, torch.ones_like(kept)


def sampled_log_probs(hidden, weight, tokens, bias, *, top_k=None, top_p=None, min_p=None,
                      temperature=1.0, softcap=None, logit_scale=1.0, ignore_index=-100,
                      return_entropy=False, impl="auto", memory_budget=None):
    """Log-probs (and entropy) of sampled ``tokens`` (no shift) under ``top_k``/``top_p``/
    ``min_p``, where a token outside its kept set joins it: finite everywhere, and equal to
    ``linear_log_probs(..., top_k=, top_p=, min_p=)`` where the token is kept (the sampler drew
    it from these weights). A dropped token means the learner's kept set differs from the
    sampler's (rounding at a boundary, or weights updated since the rollout); its log-prob is
    then that of the kept set plus the token, renormalised, and so is its entropy."""
    opts = make_options(autocast_dtype(hidden), ignore_index=ignore_index, reduction="none",
                        softcap=softcap, logit_scale=logit_scale, temperature=temperature,
                        need_entropy=return_entropy, memory_budget=memory_budget,
                        top_k=top_k, top_p=top_p, min_p=min_p)
    return truncated_log_probs(hidden, weight, tokens, bias, False, impl, opts, return_entropy,
                               False, keep_tokens=True)
