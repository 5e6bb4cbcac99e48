""":func:`cutce.linear_log_probs` with a sampler's truncation (``top_k``, ``top_p``, ``min_p``).

The truncated distribution runs on the torch backend only (also for CUDA tensors under
``impl="auto"``): validation and flattening are the untruncated path's, then
:func:`cutce.backends.pytorch.truncated.truncated_parts` gives the parts over each token's kept
set, and log p = zt - lse on kept tokens, -inf on the others.
"""

from __future__ import annotations

import torch

from .backends.pytorch import truncated
from .engine.options import Options
from .parallel import split
from .parallel import truncated as vocab_parallel
from .validate import check_impl, fail, prepare

_WHO = "top_k/top_p/min_p"


def truncated_log_probs(hidden, weight, tokens, bias, shift, impl, opts: Options,
                        return_entropy: bool, return_stats: bool, vocab_group=None,
                        vocab_start=None, reduce_hidden_grad=True):
    """logp, or (logp, entropy), of the distribution ``opts.top_k``/``top_p``/``min_p`` truncate
    (see linear_log_probs)."""
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
    # where, not arithmetic: a dropped token's -inf carries no gradient into lse or zt
    logp = torch.where(valid, torch.where(kept, zt - lse, float("-inf")), 0.0).reshape(out_shape)
    if not return_entropy:
        return logp
    return logp, torch.where(valid, lse - pz, 0.0).reshape(out_shape)
