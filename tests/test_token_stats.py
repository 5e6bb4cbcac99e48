"""linear_log_probs(return_stats=True): the per-token metrics (is_top1, mean_logits,
log_sum_sq_probs) next to the log-probs and the entropy, against a float64 reference on
materialized logits.

Inputs are dyadic (hidden in 1/8, weight and bias in 1/64), so every logit product is exact in
float32 as in float64: duplicate weight rows give bit-identical logits on every path, and the
planted ties (a target tied with an earlier class is not a hit, one tied with a later class is)
are exact everywhere. The torch path runs in float64 (exact); the Triton path in float32
through the interpreter (is_top1 compared where the reference's top-2 gap is clearly larger
than rounding), with several vocabulary tiles and splits; the vocabulary-parallel path on a
3-way uneven split (gloo, torch float64 and Triton float32).
"""

from __future__ import annotations

import datetime
import time
import traceback

import pytest
import torch

import cutce
from cutce.backends.pytorch import ce as torch_ce
from cutce.engine.options import Options
from spawn import finish_worker, run_workers

N, D, V = 37, 24, 211
IGNORE = -100
# Duplicate weight rows (bit-identical logits): a triple tie 5 = 70 = 150 across vocabulary
# tiles (BLOCK_V 32 in the interpreter), splits and ranks, and a pair 40 = 41 inside one tile.
TRIPLE = (5, 70, 150)
PAIR = (40, 41)
OPTS = dict(softcap=4.0, logit_scale=1.3, temperature=0.7)
# planted rows: (row, class its hidden state points to, its target, is_top1)
PLANTED = [(0, 5, 150, False), (1, 5, 5, True), (2, 5, 70, False), (3, 40, 41, False),
           (4, 40, 40, True), (5, 5, IGNORE, False)]
IGNORED = (5, 10, 30)  # those below the case's n


def _dyadic(x, k):
    return torch.round(x * k) / k


def make_case(seed=0, n=N):
    """float64 hidden (n, D), weight (V, D), bias (V,), tokens (n,) with the planted ties."""
    g = torch.Generator().manual_seed(seed)
    h = _dyadic(torch.randn(n, D, generator=g, dtype=torch.float64), 8)
    w = _dyadic(torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3, 64)
    b = _dyadic(torch.randn(V, generator=g, dtype=torch.float64) * 0.5, 64)
    for dup in (TRIPLE, PAIR):
        w[list(dup[1:])] = w[dup[0]].clone()
        b[list(dup[1:])] = b[dup[0]].clone()
    t = torch.randint(0, V, (n,), generator=g)
    for row, cls, tgt, _ in PLANTED:
        h[row] = _dyadic(3.0 * w[cls], 8)  # that class (and its duplicates) on top
        t[row] = tgt
    z = _logits(h, w, b, **OPTS)
    t[6:12] = z[6:12].argmax(-1)  # plain hits
    t[_ignored(n)] = IGNORE
    return h, w, b, t


def _ignored(n):
    return [i for i in IGNORED if i < n]


def _logits(h, w, b, softcap, logit_scale, temperature):
    z = logit_scale * (h.double() @ w.double().T + b.double())
    return softcap * torch.tanh(z / softcap) / temperature


def reference(h, w, b, t):
    """(log_probs, entropy, is_top1, mean_logits, log_sum_sq_probs), top-2 gap, argmax: float64."""
    z = _logits(h, w, b, **OPTS)
    valid = t != IGNORE
    tc = torch.where(valid, t, 0)
    logp = z.log_softmax(-1)
    p = z.softmax(-1)
    out = [logp.gather(1, tc[:, None])[:, 0], -(p * logp).sum(-1), z.argmax(-1) == t,
           z.mean(-1), torch.log((p * p).sum(-1))]
    out = [torch.where(valid, x, torch.zeros_like(x)) for x in out]
    top = z.amax(-1, keepdim=True)
    gap = top[:, 0] - torch.where(z < top, z, float("-inf")).amax(-1)
    return out, gap, z


def _check_stats(got, want, gap, tol, min_gap=0.0):
    assert isinstance(got, cutce.TokenStats)
    assert got.is_top1.dtype == torch.bool
    assert [x.requires_grad for x in got[2:]] == [False, False, False]
    clear = gap > min_gap
    for row, _, _, hit in PLANTED:  # the planted ties are exact on every path
        assert clear[row] and bool(got.is_top1[row]) is hit, row
    assert clear.float().mean() > 0.8
    assert torch.equal(got.is_top1[clear], want[2][clear])
    ign = _ignored(got.is_top1.shape[0])
    assert not got.is_top1[ign].any()
    for name, a, c in zip(("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"),
                          (got[0], got[1], got[3], got[4]), (want[0], want[1], want[3], want[4])):
        torch.testing.assert_close(a.double(), c, **tol, msg=lambda m: f"{name}: {m}")
        assert (a[ign] == 0).all(), name


def test_torch_float64_exact():
    h, w, b, t = make_case()
    want, gap, _ = reference(h, w, b, t)
    hh = h.clone().requires_grad_()
    got = cutce.linear_log_probs(hh, w, t, b, impl="torch", return_stats=True, **OPTS)
    _check_stats(got, want, gap, dict(rtol=1e-12, atol=1e-12))
    assert torch.equal(got.is_top1, want[2])  # float64: every row, near-ties included
    # log-probs and entropy keep their gradients
    g = torch.randn(2, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (dh,) = torch.autograd.grad((got.log_probs * g[0] + got.entropy * g[1]).sum(), hh)
    hr = h.clone().requires_grad_()
    ref, _, _ = reference(hr, w, b, t)
    (dh_ref,) = torch.autograd.grad((ref[0] * g[0] + ref[1] * g[1]).sum(), hr)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-10, atol=1e-12)


def test_torch_backend_chunks():
    """The backend's statistics parts over ragged chunks of tokens (5 rows per chunk)."""
    h, w, b, t = make_case(seed=1)
    _, _, z = reference(h, w, b, t)
    opts = Options(need_stats=True, chunk_bytes=V * 8 * 3 * 5, **OPTS)
    lse, zt, zsum, pz, lse2, zmax, amax = torch_ce.linear_lse_parts(h, w, b, t, opts)
    assert amax.dtype == torch.int64
    assert torch.equal(amax, z.argmax(-1))
    torch.testing.assert_close(zmax, z.amax(-1), rtol=0, atol=0)
    torch.testing.assert_close(lse2, torch.logsumexp(2 * z, -1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(zsum, z.sum(-1), rtol=1e-13, atol=1e-12)
    # without the flag: the four parts, the same values
    four = torch_ce.linear_lse_parts(h, w, b, t, Options(**OPTS))
    assert len(four) == 4 and torch.equal(four[0], lse) and torch.equal(four[1], zt)


def test_shapes_shift_flags_and_defaults():
    h, w, b, t = make_case(seed=2, n=18)
    h3, t3 = h.view(2, 9, D), t.view(2, 9)
    got = cutce.linear_log_probs(h3, w, t3, b, impl="torch", shift=True, return_stats=True, **OPTS)
    assert all(x.shape == (2, 8) for x in got)
    h2 = torch.cat([h3[0, :-1], h3[1, :-1]])
    t2 = torch.cat([t3[0, 1:], t3[1, 1:]])
    want, _, _ = reference(h2, w, b, t2)
    for a, c in zip(got, want):
        torch.testing.assert_close(a.reshape(-1).to(c.dtype), c, rtol=1e-12, atol=1e-12)
    # return_entropy / plain calls are unchanged, and agree with the stats call
    plain = cutce.linear_log_probs(h, w, t, b, impl="torch", **OPTS)
    logp, ent = cutce.linear_log_probs(h, w, t, b, impl="torch", return_entropy=True, **OPTS)
    both = cutce.linear_log_probs(h, w, t, b, impl="torch", return_entropy=True,
                                  return_stats=True, **OPTS)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, logp)
    assert torch.equal(both.log_probs, logp) and torch.equal(both.entropy, ent)
    with pytest.raises(ValueError, match="return_stats"):
        cutce.linear_log_probs(h, w, t, b, impl="torch", return_stats=1)


def test_torch_op_opcheck():
    """The custom op's fake implementation and autograd with the statistics' outputs."""
    h, w, b, t = make_case(seed=6, n=9)
    cfg = torch_ce._Cfg(1.3, 4.0, 0.7, True, True, None, True)
    torch.library.opcheck(torch.ops.cutce.torch_lse_parts,
                          (h.requires_grad_(), w.requires_grad_(), b, t, None, None, *cfg))


# ---- Triton (float32, interpreter) ----

def _triton():
    pytest.importorskip("triton")
    from cutce.backends import triton_reason
    h = torch.zeros(1, 1)
    if triton_reason(h) is not None:
        pytest.skip(triton_reason(h))


F32_TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n", [N, 12])  # 3 token blocks x 1 split; 1 block x 2 splits
def test_triton_float32(kernel_config, n):
    _triton()
    kernel_config(poison=True)  # launcher buffers start as NaN: unwritten rows show up
    h, w, b, t = make_case(seed=3, n=n)
    want, gap, _ = reference(h, w, b, t)
    got = cutce.linear_log_probs(h.float(), w.float(), t, b.float(), impl="triton",
                                 return_stats=True, **OPTS)
    assert got.log_probs.dtype == torch.float32
    _check_stats(got, want, gap, F32_TOL, min_gap=1e-4)


def test_triton_op_opcheck():
    _triton()
    h, w, b, t = make_case(seed=7, n=9)
    h, w, b = (x.float().requires_grad_() for x in (h, w, b))
    for need_stats in (True, False):
        torch.library.opcheck(torch.ops.cutce.lse_parts, (h, w, b, t, None, None, 1.3, 4.0, 1 / 0.7,
                                                          True, True, 0.0, None, [], False,
                                                          need_stats))


def test_triton_forward_tiles_and_splits(kernel_config):
    """The kernel's running argmax and sum of squares across 7 tiles (the last ragged) and 1, 3
    (3 + 3 + 1 tiles) and 7 vocabulary splits; then 14 tiles of 16 in 3 splits."""
    _triton()
    from cutce.backends.triton import configs
    from cutce.backends.triton import forward as tfwd
    kernel_config(poison=True)
    h, w, b, t = make_case(seed=4)
    _, gap, z = reference(h, w, b, t)
    clear = gap > 1e-4
    args = (h.float(), w.float(), b.float(), t, OPTS["logit_scale"], OPTS["softcap"],
            1.0 / OPTS["temperature"], True, True)
    runs = [(None, s) for s in (1, 3, 7)] + [(configs.TileConfig(16, 16, 16, 1, 1), 3)]
    for tile, splits in runs:
        if tile is not None:
            kernel_config(fwd_tile_f32=tile)
        out = tfwd.forward(*args, n_splits=splits, need_stats=True)
        assert len(out) == 8
        lse2, zmax, amax = out[5:]
        assert amax.dtype == torch.int64
        assert torch.equal(amax[clear], z.argmax(-1)[clear]), (tile, splits)
        for row, cls, *_ in PLANTED:
            assert int(amax[row]) == next(d for d in (TRIPLE, PAIR) if cls in d)[0], (tile, splits, row)
        torch.testing.assert_close(zmax.double(), z.amax(-1), **F32_TOL)
        torch.testing.assert_close(lse2.double(), torch.logsumexp(2 * z, -1), **F32_TOL)
        assert torch.equal(out[0], tfwd.forward(*args, n_splits=splits)[0])  # lse unchanged
    assert len(tfwd.forward(*args)) == 5  # without the flag: the loss's outputs only


# ---- vocabulary parallelism: 3 ranks, uneven slices ----

WORLD = 3
# rank r holds SLICES[r]; "reversed" hands them out in reverse order (vocab_start): ties between
# ranks must still go to the smallest global class id, not to the lowest rank
SIZES = [60, 90, 61]  # the triple tie 5 / 70 / 150 lands on three different ranks


def _dist_cases(rank, group):
    failures = []
    h, w, b, t = make_case(seed=5)
    want, gap, _ = reference(h, w, b, t)
    for order in ("ranks", "reversed"):
        block = WORLD - 1 - rank if order == "reversed" else rank
        start = sum(SIZES[:block])
        sl = slice(start, start + SIZES[block])
        kw = dict(vocab_group=group, return_stats=True, **OPTS)
        if order == "reversed":
            kw["vocab_start"] = start
        runs = [("torch", torch.float64, dict(rtol=1e-12, atol=1e-12), 0.0)]
        if _triton_ok():
            runs.append(("triton", torch.float32, F32_TOL, 1e-4))
        for impl, dt, tol, min_gap in runs:
            try:
                got = cutce.linear_log_probs(h.to(dt), w[sl].to(dt), t, b[sl].to(dt), impl=impl, **kw)
                _check_stats(got, want, gap, tol, min_gap=min_gap)
                if impl == "torch":
                    assert torch.equal(got.is_top1, want[2])
            except Exception:
                failures.append(f"{order} {impl}: {traceback.format_exc(limit=-3)}")
    return failures


def _triton_ok():
    try:
        from cutce.backends import triton_reason
        return triton_reason(torch.zeros(1, 1)) is None
    except Exception:
        return False


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)  # 3 processes share the cores
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    out = {}
    t0 = time.perf_counter()
    try:
        out["failures"] = _dist_cases(rank, torch.distributed.group.WORLD)
    except Exception:
        out["failures"] = [traceback.format_exc(limit=4)]
    finally:
        out["seconds"] = time.perf_counter() - t0
        finish_worker(rank, outdir, out)


def test_vocab_parallel_3_ranks(tmp_path):
    results = run_workers(_worker, (WORLD,), WORLD, tmp_path, 120, "token-stats workers")
    failures = [f"rank {r}: {msg}" for r, res in enumerate(results) for msg in res["failures"]]
    assert not failures, "\n".join(failures[:10])
