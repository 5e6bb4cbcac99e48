"""Log-probs of a truncated sampler's distribution (min-p, top-k, top-p), chunked on the torch path.

Per token i, with z the transformed logits (as in :mod:`cutce.backends.pytorch.ce`) and K_i the
kept set of the options' ``top_k``/``top_p``/``min_p`` (``{j : z_ij >= thr_i}``, see
:class:`cutce.engine.options.Options`)::

    lse_i  = logsumexp_{j in K_i} z_ij
    zt_i   = z_{i, t_i}                        (0 where t_i is not in [0, V))
    pz_i   = sum_{j in K_i} q_ij z_ij          q = softmax over K_i (0 unless need_entropy)
    thr_i  = min_{j in K_i} z_ij               not differentiable
    kept_i = t_i in K_i                        bool, not differentiable

K_i is piecewise constant in the logits, so the gradient is that of a log-softmax restricted to
K_i: tokens outside it get none. The forward finds thr per row (:mod:`.thresholds`: a softmax
for min-p, a ``torch.topk`` for top-k, top-p from the largest logits) and keeps it. Two
backwards:

- from lists (:mod:`.kept_sets`): the forward lists each row's kept ids with their logits
  while they fit a budget of ids per token; dz is then nonzero at those ids and the target,
  and dE, dC are a weighted gather and scatter of weight rows for all tokens at once, with no
  logits recomputed;
- recompute (a call whose lists outgrew the budget): each chunk's logits again with the same
  chunks (the same products, so the same bits), masked with ``z >= thr``, without sorting
  again.

No tensor of N x V elements exists at any time.

On CUDA, 16-bit inputs are multiplied as they are into float32 logits (``Head``: no float32
copy of the weight, and a 16-bit GEMM instead of a float32 one, ~15x slower on an H100). The
backward rounds the float32 logit gradient to the inputs' dtype for its two GEMMs, as the Triton
backward of the untruncated call does: torch multiplies no float32 by 16-bit operand, so the
alternative is a float32 copy of the weight and float32 GEMMs. It collects several chunks'
16-bit gradients before them, so that dC's float32 accumulator is read and written once per
group rather than per chunk. Elsewhere (CPU, float32/64 inputs) everything is in the compute
dtype.

Both loops are ``torch.library`` custom ops with fake implementations, as in ce.py, so
``torch.compile`` sees one opaque node per direction.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...engine.options import Options
from . import common, kept_sets, thresholds
from .ce import DEFAULT_CHUNK_BYTES, _valid_targets, compute_dtype, transform_

# A chunk's temporaries when Options.chunk_bytes is None. CUDA's 16-bit GEMMs reach their speed
# only from a few hundred rows (each chunk reads the whole weight): 1 GiB is 441 rows of top-k
# at V=152064 (220 of top-p), about what the untruncated Triton call spends beyond its float32 dC.
CHUNK_BYTES = {"cpu": DEFAULT_CHUNK_BYTES, "cuda": 2**30}
# chunk x V float32 temporaries at once: top-p's forward holds z, the sorted values with their
# int64 indices (two float32's worth) and about as much again inside the sort; the other
# forwards z, a masked copy or softmax, a few bool masks and the entropy's product.
_TEMPS_TOP_P, _TEMPS = 7, 4
# The backward's: z, q and the keep mask (the rest of the budget holds the 16-bit group).
_BACKWARD_TEMPS = 3


class _Cfg(NamedTuple):
    logit_scale: float
    softcap: float | None
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    need_entropy: bool
    chunk_bytes: int | None
    rows: int | None  # tokens per chunk, fixed (None: from the budget)


_CFG_SCHEMA = ("float logit_scale, float? softcap, float temperature, int? top_k, float? top_p, "
               "float? min_p, bool need_entropy, int? chunk_bytes, int? rows")


def make_cfg(opts: Options, chunk_bytes=None, rows=None) -> _Cfg:
    """The op's configuration (also what the vocabulary-parallel thresholds read)."""
    return _Cfg(float(opts.logit_scale), opts.softcap, float(opts.temperature), opts.top_k,
                opts.top_p, opts.min_p, opts.need_entropy,
                opts.chunk_bytes if chunk_bytes is None else chunk_bytes, rows)


def _budget(cfg: _Cfg, device) -> int:
    if cfg.chunk_bytes is not None:
        return cfg.chunk_bytes
    return CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])


def chunk_rows(n, vocab, cdt, cfg: _Cfg, device) -> int:
    """Tokens per chunk: the forward's chunk x ``vocab`` temporaries within the chunk budget
    (``cfg.rows`` where given: a vocabulary slice takes the whole vocabulary's chunks)."""
    if cfg.rows is not None:
        return max(1, min(max(n, 1), cfg.rows))
    temps = _TEMPS_TOP_P if cfg.top_p is not None else _TEMPS
    return common.chunk_rows(n, vocab, cdt, _budget(cfg, device), temps)


def _group_rows(n, vocab, rows, cfg: _Cfg, device) -> int:
    """Tokens whose 16-bit logit gradients the mixed backward collects before its GEMMs: a
    multiple of ``rows`` (the forward's chunks, kept) in what the budget leaves beside the
    backward's own chunk temporaries."""
    spare = _budget(cfg, device) - rows * max(vocab, 1) * 4 * _BACKWARD_TEMPS
    k = max(1, spare // (max(vocab, 1) * 2 * rows))
    return min(max(n, 1), k * rows) // rows * rows if n > rows else rows


def head(hidden, weight, bias):
    """The chunks' matmuls (see common.Head): 16-bit operands as they are on CUDA."""
    return common.Head(hidden, weight, bias, compute_dtype(hidden.dtype))


def chunk_logits(hd: common.Head, s, e, cfg: _Cfg):
    """(z, dcap) of rows s:e in the compute dtype; the one place the chunks' logits come from,
    so that a recompute with the same chunks gives the same bits."""
    return transform_(hd.logits(s, e), cfg)


def _forward(hidden, weight, bias, targets, thr_in, cfg: _Cfg):
    cdt = compute_dtype(hidden.dtype)
    n, vocab = hidden.shape[0], weight.shape[0]
    hd = head(hidden, weight, bias)
    lse = hidden.new_empty(n, dtype=cdt)
    zt, pz, thr = torch.zeros_like(lse), torch.zeros_like(lse), torch.empty_like(lse)
    kept = hidden.new_zeros(n, dtype=torch.bool)
    lists = kept_sets.Lists(n, vocab, cdt, hidden.device)
    rows = chunk_rows(n, vocab, cdt, cfg, hidden.device)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        z, _ = chunk_logits(hd, s, e, cfg)
        t, v = (thr_in[s:e], None) if thr_in is not None else thresholds.find(z, cfg)
        thr[s:e] = t
        idx, valid = _valid_targets(targets[s:e], vocab)
        zt_rows = z.gather(1, idx).squeeze(1)
        zt[s:e] = torch.where(valid, zt_rows, 0.0)
        kept[s:e] = valid & (zt_rows >= t)
        keep = z >= t[:, None]
        listed = lists.add(s, keep, z)
        if listed is not None:
            del z, keep
            lse[s:e], pz[s:e] = kept_sets.list_stats(*listed, cfg.need_entropy)
            continue
        if v is not None:
            # Top-k's k candidates hold the kept set but for the logits tied with thr that
            # top-k left out, each worth exp(thr): no pass over the chunk's exponentials.
            extra = keep.sum(dim=1) - (v >= t[:, None]).sum(dim=1)
            lse[s:e], pz[s:e] = kept_sets.top_k_stats(v, t, extra, cfg.need_entropy)
            continue
        # The row's largest logit is always kept: it shifts the exponentials of the kept set.
        # (With thresholds from the whole vocabulary, a slice keeps its largest logit or none.)
        m = z.amax(dim=1, keepdim=True)
        q = torch.where(keep, z.sub_(m).exp_(), 0.0)
        del z, keep
        tot = q.sum(dim=1, keepdim=True)
        lse[s:e] = (m + tot.log()).squeeze(1)
        if cfg.need_entropy:
            q.div_(tot)  # q = softmax over the kept set; sum q z = sum q log q + lse
            # 0, not NaN, for a vocabulary slice that keeps nothing of a row (lse = -inf there)
            pz[s:e] = torch.where(tot.squeeze(1) > 0, torch.xlogy(q, q).sum(dim=1) + lse[s:e], 0.0)
    return (lse, zt, pz, thr, kept) + lists.outputs()


def _backward(hidden, weight, bias, targets, saved, grads, need_h, need_w, need_b, cfg: _Cfg):
    """(dh, dw, db) from the forward's ``saved`` (lse, zt, pz, thr, counts, cols, vals: the
    kept sets' lists, empty where the forward dropped them) and the upstream ``grads`` (g_lse,
    g_zt, g_pz)."""
    lse, listed = saved[0], saved[5].numel() > 0
    cdt = lse.dtype
    n, vocab = hidden.shape[0], weight.shape[0]
    zeros = torch.zeros_like(lse)
    grads = tuple(zeros if g is None else g for g in grads[:2]) + (grads[2],)
    if listed:
        dh, dw, db = kept_sets.grads(hidden, weight, targets, saved, grads, need_h, need_w,
                                     need_b, cfg)
        return common.op_grads(hidden, weight, bias, None if dh is None else dh.to(hidden.dtype),
                               dw, db)
    hd = head(hidden, weight, bias)
    dh = torch.empty_like(hidden) if need_h else None
    dw = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
    db = lse.new_zeros(vocab) if need_b else None
    rows = chunk_rows(n, vocab, cdt, cfg, hidden.device)  # the forward's: the same logits' bits
    group = _group_rows(n, vocab, rows, cfg, hidden.device) if hd.mixed else rows
    buf = hidden.new_empty(min(group, n), vocab) if hd.mixed and (need_h or need_w) else None
    for g0 in range(0, n, group):
        g1 = min(g0 + group, n)
        for s in range(g0, g1, rows):
            e = min(s + rows, g1)
            dz = _chunk_grad(hd, s, e, targets, saved, grads, cfg)
            if db is not None:
                db += dz.sum(dim=0)
            if buf is not None:
                buf[s - g0:e - g0] = dz  # rounded to the inputs' dtype
                dz = None
        dzg = dz if buf is None else buf[:g1 - g0]
        if dh is not None:
            dh[g0:g1] = hd.grad_hidden(dzg).to(dh.dtype)
        if dw is not None:
            hd.add_grad_weight(dw, dzg, g0, g1)
        del dz, dzg
    return common.op_grads(hidden, weight, bias, dh, dw, db)


def _chunk_grad(hd, s, e, targets, saved, grads, cfg: _Cfg):
    """dz of rows s:e (chunk x V, compute dtype): the gradient of the parts w.r.t. the
    products h W^T + b."""
    lse, _, pz, thr = saved[:4]
    g_lse, g_zt, g_pz = grads
    z, dcap = chunk_logits(hd, s, e, cfg)
    keep = z >= thr[s:e, None]
    q = torch.sub(z, lse[s:e, None]).exp_().masked_fill_(keep.logical_not_(), 0.0)
    del keep
    if g_pz is not None and cfg.need_entropy:
        # d(sum_K q_j z_j)/dz_k = q_k (1 + z_k - sum_K q_j z_j) for k in K, 0 outside
        z.sub_(pz[s:e, None]).add_(1.0).mul_(g_pz[s:e, None]).add_(g_lse[s:e, None])
        dz = q.mul_(z)
    else:
        dz = q.mul_(g_lse[s:e, None])
    del z
    idx, valid = _valid_targets(targets[s:e], hd.weight.shape[0])
    dz.scatter_add_(1, idx, torch.where(valid, g_zt[s:e], 0.0).unsqueeze(1))
    if dcap is not None:
        dz *= dcap
    scale = cfg.logit_scale / cfg.temperature
    if scale != 1.0:
        dz *= scale
    return dz


# Autocast is off inside (as in ce.py): the api already cast the inputs, and the chunk
# products must stay in float32 (float64). Besides the parts, the forward returns thr, kept and
# the kept sets' lists (kept_sets.Lists.outputs: cols and vals empty where they were dropped).
@torch.library.custom_op(
    "cutce::torch_truncated_parts", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? thr, "
           f"{_CFG_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _parts_op(hidden, weight, bias, targets, thr, *cfg):
    with torch.autocast(hidden.device.type, enabled=False):
        return _forward(hidden, weight, bias, targets, thr, _Cfg(*cfg))


@_parts_op.register_fake
def _(hidden, weight, bias, targets, thr, *cfg):
    n, cdt = hidden.shape[0], compute_dtype(hidden.dtype)
    lse = hidden.new_empty(n, dtype=cdt)
    size = torch.library.get_ctx().new_dynamic_size()  # the lists' buffers, or 0 if dropped
    return (lse, torch.empty_like(lse), torch.empty_like(lse), torch.empty_like(lse),
            hidden.new_empty(n, dtype=torch.bool), hidden.new_empty(n, dtype=torch.int64),
            hidden.new_empty(size, dtype=torch.int64), hidden.new_empty(size, dtype=cdt))


@torch.library.custom_op(
    "cutce::torch_truncated_parts_backward", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, Tensor zt, "
           "Tensor pz, Tensor thr, Tensor counts, Tensor cols, Tensor vals, Tensor? g_lse, "
           "Tensor? g_zt, Tensor? g_pz, bool need_h, bool need_w, bool need_b, "
           f"{_CFG_SCHEMA}) -> (Tensor, Tensor, Tensor)")
def _backward_op(hidden, weight, bias, targets, lse, zt, pz, thr, counts, cols, vals, g_lse, g_zt,
                 g_pz, need_h, need_w, need_b, *cfg):
    with torch.autocast(hidden.device.type, enabled=False):
        return _backward(hidden, weight, bias, targets, (lse, zt, pz, thr, counts, cols, vals),
                         (g_lse, g_zt, g_pz), need_h, need_w, need_b, _Cfg(*cfg))


@_backward_op.register_fake
def _(hidden, weight, bias, targets, lse, zt, pz, thr, counts, cols, vals, g_lse, g_zt, g_pz,
      need_h, need_w, need_b, *cfg):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else hidden.new_empty(0),
            torch.empty_like(bias) if need_b else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, _, *cfg = inputs
    lse, zt, pz, thr, kept, counts, cols, vals = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, zt, pz, thr, counts, cols, vals)
    ctx.mark_non_differentiable(thr, kept, counts, cols, vals)
    ctx.cfg = cfg


def _parts_backward(ctx, g_lse, g_zt, g_pz, *_):
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.saved_tensors[2] is not None
    dh, dw, db = _backward_op(*ctx.saved_tensors, g_lse, g_zt, g_pz, need_h, need_w, need_b,
                              *ctx.cfg)
    return (dh if need_h else None, dw if need_w else None, db if need_b else None,
            None, None) + (None,) * len(ctx.cfg)


_parts_op.register_autograd(_parts_backward, setup_context=_setup_context)


def truncated_parts(hidden, weight, bias, targets, opts: Options, chunk_bytes=None, thr=None,
                    rows=None):
    """The truncated distribution's parts on the torch path.

    Args:
        hidden: (N, D) float tensor; weight: (V, D), same dtype and device; bias: (V,) or None.
        targets: (N,) int64; entries outside [0, V) give zt = 0 and kept = False.
        opts: validated :class:`Options` (logit_scale, softcap, temperature, need_entropy and
            the truncation: top_k, top_p, min_p).
        chunk_bytes: cap on one chunk's temporaries (default: CHUNK_BYTES of the device).
        thr: None, or (N,) each row's threshold, found elsewhere (over the whole vocabulary
            when ``weight`` is one slice of it): the kept set is then ``z >= thr`` and lse, pz
            are this slice's (lse = -inf, pz = 0 where it keeps nothing).
        rows: None, or the tokens per chunk (those ``thr`` was found with: the same products).

    Returns:
        (lse, zt, pz, kept), each (N,): the first three float32 (float64 for float64 inputs)
        and differentiable w.r.t. hidden, weight and bias; kept bool. With K the kept set::

            lse = torch.logsumexp(z.masked_fill(~K, -inf), -1)
            zt = z.gather(1, targets[:, None])[:, 0]; kept = K.gather(1, targets[:, None])[:, 0]
            pz = (torch.softmax(z.masked_fill(~K, -inf), -1) * z.masked_fill(~K, 0)).sum(-1)
    """
    cfg = make_cfg(opts, chunk_bytes, rows)
    lse, zt, pz, _, kept, *_ = _parts_op(hidden, weight, bias, targets,
                                         None if thr is None else thr.detach(), *cfg)
    return lse, zt, pz, kept
