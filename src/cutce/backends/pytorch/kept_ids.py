"""The truncated log-probs' sparse route: each row's kept set as top-k's ids.

With top-k on, the kept set is top-k's ids whose logit is at or above the row's threshold, plus
the logits tied with the threshold that ``torch.topk`` left out (it returns k of them). The
forward keeps the ids with their logits and counts those ties; lse and pz are then sums over k
entries and the ties. The backward's dz is nonzero at k + 1 ids a row (the target last), so no
logits are recomputed: dE is a weighted sum of k + 1 weight rows per token and dC the matching
scatter, for all tokens at once. A tie left out has no id: a group of chunks holding one
recomputes (see :mod:`cutce.backends.pytorch.truncated`).
"""

from __future__ import annotations

import torch

from .ce import _valid_targets
from .gather import gathered_grads

# The largest top-k whose ids the forward keeps for the backward. There dE and dC are a gather
# and a scatter of k + 1 weight rows a token in place of two GEMMs over the whole vocabulary. An
# estimate, not yet a measurement: at the Qwen2.5-7B head (D = 3584, V = 152064), 16k tokens and
# k = 256, each reads ~30 GB (~10 ms on an H100) where each GEMM computes 18 TFLOP (~25 ms).
SPARSE_TOP_K = 256


def sparse(cfg, vocab: int, thr_given: bool) -> bool:
    """Whether the call keeps each row's top-k ids for a backward without a recompute: top-k at
    most :data:`SPARSE_TOP_K`, thresholds found here (a vocabulary slice's kept set is not its
    own top-k)."""
    return (not thr_given and cfg.top_k is not None and cfg.top_k <= SPARSE_TOP_K
            and cfg.top_k < vocab)


def stats(v, t, extra, need_entropy):
    """(lse, pz) (r,) over the kept set of top-k's candidates v (r, k) and ``extra`` logits
    equal to thr t."""
    m = v.amax(dim=1)  # the row's largest logit: min-p never drops it
    e = torch.where(v >= t[:, None], torch.exp(v - m[:, None]), 0.0)
    ex = torch.exp(t - m)
    tot = e.sum(dim=1) + extra * ex
    lse = m + tot.log()
    if not need_entropy:
        return lse, torch.zeros_like(lse)
    q, qx = e.div_(tot[:, None]), ex / tot
    return lse, torch.xlogy(q, q).sum(dim=1) + extra * torch.xlogy(qx, qx) + lse


def dense_groups(extra, n, group):
    """Per group of ``group`` rows, whether one of its rows keeps logits tied with its threshold
    that top-k's ids miss: that group recomputes its logits. One device-to-host copy per call."""
    pad = -n % group
    over = torch.nn.functional.pad(extra, (0, pad)).view(-1, group).gt(0).any(dim=1)
    return over.tolist()


def grads(hidden, weight, targets, saved, grads, dense, group, need_h, need_w, need_b, cfg):
    """(dh, dw, db) of every row outside the ``dense`` groups of ``group`` rows (0 in those),
    from dz at top-k's ids and the targets: one :func:`.gather.gathered_grads` for all rows
    (dE an embedding_bag of weight rows, dC and db its backward). dh and dw in the weight's
    dtype on CUDA with 16-bit weights, else in the compute dtype; None where not needed."""
    n, vocab = hidden.shape[0], weight.shape[0]
    idx, coef = _dz(0, n, targets, saved, grads, vocab, cfg)
    if any(dense):
        live = torch.tensor(dense, device=coef.device).logical_not_()
        coef.mul_(live.repeat_interleave(group)[:n, None])
    dh, dw, db = gathered_grads(hidden, weight, idx, coef, need_h, need_w, need_b)
    return (dh if need_h else None), (dw if need_w else None), (db if need_b else None)


def _dz(s, e, targets, saved, grads, vocab, cfg):
    """(idx, coef) (r, k + 1): rows s:e of dz (see :func:`_chunk_grad`) at top-k's ids and,
    last, the target where top-k's ids miss it."""
    lse, zt, pz, thr, ids, vals, _ = saved
    g_lse, g_zt, g_pz = grads
    keep = vals[s:e] >= thr[s:e, None]
    v = torch.where(keep, vals[s:e], 0.0)  # no -inf of min-p in the products below
    coef = torch.exp(v - lse[s:e, None]).mul_(keep)
    if g_pz is not None and cfg.need_entropy:
        coef.mul_((v - pz[s:e, None] + 1.0) * g_pz[s:e, None] + g_lse[s:e, None])
    else:
        coef.mul_(g_lse[s:e, None])
    t, valid = _valid_targets(targets[s:e], vocab)
    gt = torch.where(valid, g_zt[s:e], 0.0)
    hit = ids[s:e] == t
    coef.add_(hit * gt[:, None])
    idx = torch.cat([ids[s:e], t], dim=1)
    coef = torch.cat([coef, torch.where(hit.any(dim=1), 0.0, gt)[:, None]], dim=1)
    if cfg.softcap:
        # d(softcap tanh(y / softcap))/dy = 1 - (z T / softcap)^2 at the transformed logit z
        # (at the target its own logit: min-p's -inf stands in the ids for a dropped one)
        y = torch.cat([torch.where(hit, zt[s:e, None], v), zt[s:e, None]], dim=1)
        y.mul_(cfg.temperature / cfg.softcap)
        coef.mul_(y.square_().neg_().add_(1.0))
    scale = cfg.logit_scale / cfg.temperature
    if scale != 1.0:
        coef *= scale
    return idx, coef
