"""A sampler's truncated distribution from MATERIALIZED float64 logits, independent of cutce, and
the inputs of the truncation tests (a helper, not a test module).

The kept set is spelled out without sorting: min-p compares probabilities, top-k counts the
logits strictly above each one, and top-p sums, for each token, the renormalised mass of the
kept tokens whose logit is at or below its own (ties share one cumulative mass):

    keep  = p >= min_p * p.max()                         p = softmax(z)
    keep &= #{i in keep : z_i > z_j} < top_k
    keep &= sum_{i in keep, z_i <= z_j} q_i > 1 - top_p  q = softmax(z over keep); the max stays
"""

from __future__ import annotations

import math

import torch


def transformed(h, w, b, logit_scale=1.0, softcap=None, temperature=1.0):
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def kept_set(z, top_k=None, top_p=None, min_p=None):
    """(N, V) bool: the tokens a vLLM-style sampler can draw (z float64, no gradient needed)."""
    z = z.detach()
    keep = torch.ones_like(z, dtype=torch.bool)
    if min_p is not None:
        p = z.softmax(-1)
        keep &= p >= min_p * p.amax(-1, keepdim=True)
    if top_k is not None:
        above = ((z[:, None, :] > z[:, :, None]) & keep[:, None, :]).sum(-1)
        keep &= above < top_k
    if top_p is not None:
        q = z.masked_fill(~keep, -math.inf).softmax(-1)
        at_or_below = ((z[:, None, :] <= z[:, :, None]) * q[:, None, :]).sum(-1)
        keep &= (at_or_below > 1.0 - top_p) | (z == z.amax(-1, keepdim=True))
    return keep


def boundary_margin(z, top_k=None, top_p=None, min_p=None):
    """How far the inputs are from flipping a token in or out of the kept set under rounding:
    the smallest relative distance of a min-p ratio from min_p and of a top-p cumulative mass
    from 1 - top_p (top-k compares logits, whose ties the tests make exact)."""
    z = z.detach()
    out = math.inf
    keep = torch.ones_like(z, dtype=torch.bool)
    if min_p is not None:
        p = z.softmax(-1)
        ratio = p / p.amax(-1, keepdim=True)
        out = min(out, ((ratio - min_p).abs() / min_p).min().item())
        keep &= p >= min_p * p.amax(-1, keepdim=True)
    if top_k is not None:
        keep &= ((z[:, None, :] > z[:, :, None]) & keep[:, None, :]).sum(-1) < top_k
    if top_p is not None:
        q = z.masked_fill(~keep, -math.inf).softmax(-1)
        mass = ((z[:, None, :] <= z[:, :, None]) * q[:, None, :]).sum(-1)
        out = min(out, (mass - (1.0 - top_p)).abs()[keep].min().item())
    return out


def reference(h, w, t, b=None, *, temperature=1.0, softcap=None, logit_scale=1.0, shift=False,
              ignore_index=-100, top_k=None, top_p=None, min_p=None):
    """(logp, entropy) of the truncated distribution, float64, differentiable through the
    logits on the kept set (the set itself is computed without gradient): -inf for a dropped
    token, 0 at ignored positions."""
    if shift:
        h, t = h[..., :-1, :], t[..., 1:]
    shape = t.shape
    h2, t1 = h.reshape(-1, h.shape[-1]).double(), t.reshape(-1)
    z = transformed(h2, w.double(), None if b is None else b.double(), logit_scale, softcap,
                    temperature)
    keep = kept_set(z, top_k, top_p, min_p)
    lsm = z.masked_fill(~keep, -math.inf).log_softmax(-1)
    valid = t1 != ignore_index
    logp = lsm.gather(-1, torch.where(valid, t1, 0)[:, None])[:, 0]
    ent = -(lsm.exp() * lsm.masked_fill(~keep, 0.0)).sum(-1)
    zero = torch.zeros((), dtype=z.dtype)
    return (torch.where(valid, logp, zero).reshape(shape),
            torch.where(valid, ent, zero).reshape(shape))


def grid(gen, *shape, step=0.25, hi=1.0):
    """Multiples of ``step`` in [-hi, hi]: their products and sums are exact in float32 (and
    bfloat16 holds them), so equal logits are equal on every path and near-ties keep their gap."""
    n = int(round(hi / step))
    return torch.randint(-n, n + 1, shape, generator=gen).double() * step


def draw_options(gen, vocab):
    """Random truncation (each of the three on or off, at least one on) and logit transform."""
    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=gen))]

    def u(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))

    while True:
        opts = dict(top_k=pick([None, 1, 2, 5, vocab // 3, vocab + 3]),
                    top_p=pick([None, u(0.05, 0.99)]),
                    min_p=pick([None, u(0.001, 0.5)]))
        if any(v is not None for v in opts.values()):
            break
    opts.update(temperature=pick([1.0, 0.7, 1.3]), softcap=pick([None, 5.0, 30.0]),
                logit_scale=pick([1.0, 0.5, 1.25]), shift=pick([False, True]))
    return opts


def make_case(gen, n, d, vocab, dtype, *, bias=True, exact=True, ignore_frac=0.2,
              tries=50):
    """(h, w, b, t, opts), h of shape (n, d) (or (2, n // 2 + 1, d) with shift), far from every
    rounding-sensitive boundary (min-p ratio, top-p mass). ``exact``: grid values with
    duplicated rows (exact ties) and rows one small step apart (near-ties)."""
    for _ in range(tries):
        opts = draw_options(gen, vocab)
        rows = (2, n // 2 + 1) if opts["shift"] else (n,)
        if exact:
            w = grid(gen, vocab, d)
            dup = torch.randint(vocab, (vocab // 4,), generator=gen)
            w[: vocab // 4] = w[dup]  # exact ties
            w[vocab // 4: vocab // 2, 0] = w[vocab // 4: vocab // 2, 0] + 2.0**-10  # near-ties
            h = grid(gen, *rows, d)
            b = grid(gen, vocab) if bias else None
        else:
            w = torch.randn(vocab, d, generator=gen, dtype=torch.float64) / d**0.5
            h = 2.0 * torch.randn(*rows, d, generator=gen, dtype=torch.float64)
            b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
        t = torch.randint(vocab, rows, generator=gen)
        t[torch.rand(rows, generator=gen) < ignore_frac] = -100
        h, w = h.to(dtype), w.to(dtype)
        b = None if b is None else b.to(dtype)
        hs = h[..., :-1, :] if opts["shift"] else h
        z = transformed(hs.reshape(-1, d).double(), w.double(), None if b is None else b.double(),
                        opts["logit_scale"], opts["softcap"], opts["temperature"])
        if boundary_margin(z, opts["top_k"], opts["top_p"], opts["min_p"]) > 1e-4:
            return h, w, b, t, opts
    raise AssertionError("no case far enough from the boundaries")
