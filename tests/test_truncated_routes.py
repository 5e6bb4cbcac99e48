"""The truncated log-probs' two shortcuts against the plain chunked path and float64 truth: the
backward from the forward's lists of kept ids (no recomputed logits; a call whose lists outgrow
their budget recomputes) and top-p's candidates (the largest logits in place of a sort; rows
whose nucleus reaches past them sort)."""

from __future__ import annotations

import pytest
import torch

import cutce
from cutce.backends.pytorch import kept_sets, thresholds, truncated
from cutce.truncated_log_probs import sampled_log_probs
from reference import rel_err
from truncated_cases import make_case, reference

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _grads(h, w, b, t, opts, up, sampled=False):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    if sampled:
        logp, ent = sampled_log_probs(*leaves[:2], t, leaves[2],
                                            return_entropy=True, impl="torch", **opts)
    else:
        logp, ent = cutce.linear_log_probs(*leaves[:2], t, leaves[2], return_entropy=True,
                                           impl="torch", **opts)
    fin = torch.where(torch.isinf(logp), 0.0, logp)
    return [logp, ent, *torch.autograd.grad((fin * up[0]).sum() + (ent * up[1]).sum(), leaves)]


def _unshift(h, t, opts):
    """The rows make_case checked, flat, with the shift done here (sampled_log_probs has none)."""
    if opts.pop("shift"):
        h, t = h[..., :-1, :], t[..., 1:]
    return h.reshape(-1, h.shape[-1]).contiguous(), t.reshape(-1)


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kw):
        out = real(*args, **kw)
        calls.append(out)
        return out

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("sampled", [False, True], ids=["log_probs", "sampled"])
@pytest.mark.parametrize("draw", range(8))
def test_listed_backward_equals_the_recompute(gen, monkeypatch, draw, sampled):
    """Random truncations and transforms on grid logits with exact ties (at top-k's k-th logit
    too) or Gaussian ones, in chunks of a few rows: the same values and gradients from the
    lists as from the recompute, in float64, and within tolerance of the float64 truth in
    float32."""
    n, d, v = 45, 7, 61
    h, w, b, t, opts = make_case(gen, n, d, v, torch.float64, exact=draw % 2 == 0)
    h, t = _unshift(h, t, opts)
    up = torch.randn(h.shape[0], generator=gen), torch.randn(h.shape[0], generator=gen)
    up = tuple(u.double() for u in up)
    monkeypatch.setitem(truncated.CHUNK_BYTES, "cpu", 5 * v * 8 * truncated._TEMPS_TOP_P)
    listed = _spy(monkeypatch, kept_sets, "grads")
    got = _grads(h, w, b, t, opts, up, sampled)
    assert len(listed) == 1
    monkeypatch.setattr(kept_sets, "IDS_PER_TOKEN", 0)  # nothing fits: the recompute
    want = _grads(h, w, b, t, opts, up, sampled)
    assert len(listed) == 1
    assert torch.equal(torch.isneginf(got[0]), torch.isneginf(want[0]))
    fin = torch.isfinite(want[0])
    assert rel_err(got[0][fin], want[0][fin]) < 1e-12
    for a, r in zip(got[1:], want[1:]):
        assert rel_err(a, r) < 1e-12
    if not sampled:
        f32 = _grads(h.float(), w.float(), b.float(), t, opts, tuple(u.float() for u in up))
        ref = [x.detach().clone().requires_grad_() for x in (h, w, b)]
        rl, re = reference(ref[0], ref[1], t, ref[2], **opts)
        rfin = torch.where(torch.isinf(rl), 0.0, rl)
        truth = torch.autograd.grad((rfin * up[0]).sum() + (re * up[1]).sum(), ref)
        assert torch.equal(torch.isneginf(f32[0]), torch.isneginf(rl))
        for a, r in zip(f32[2:], truth):
            assert rel_err(a, r) < 2e-5


def test_lists_that_outgrow_their_budget_mid_call(gen, monkeypatch):
    """A budget that the first chunks fit and a later one breaks: the recompute, the same bits
    as with no lists at all."""
    h, w, b, t, _ = make_case(gen, 40, 6, 50, torch.float64)
    h, t = h.reshape(-1, 6)[:40], t.reshape(-1)[:40]
    up = (torch.randn(40, generator=gen, dtype=torch.float64),) * 2
    opts = dict(top_p=0.9)
    monkeypatch.setitem(truncated.CHUNK_BYTES, "cpu", 4 * 50 * 8 * truncated._TEMPS_TOP_P)
    counts = []
    real = kept_sets.Lists.add

    def add(self, s, keep, z):
        counts.append(int(keep.sum()))
        real(self, s, keep, z)

    monkeypatch.setattr(kept_sets.Lists, "add", add)
    _grads(h, w, b, t, opts, up)
    # a budget between the first chunk's ids and the whole call's
    per_token = (counts[0] + sum(counts)) // 2 // 40 + 1
    monkeypatch.setattr(kept_sets, "IDS_PER_TOKEN", 0)
    want = _grads(h, w, b, t, opts, up)  # the recompute from the start
    counts = counts[:len(counts) // 2]
    assert counts[0] < per_token * 40 < sum(counts)
    monkeypatch.setattr(kept_sets, "IDS_PER_TOKEN", per_token)
    listed = _spy(monkeypatch, kept_sets, "grads")
    got = _grads(h, w, b, t, opts, up)
    assert not listed
    for a, r in zip(got, want):
        assert torch.equal(a, r)


def test_ties_at_the_kth_logit_are_listed(monkeypatch):
    """k = 2 on a row whose second largest logit appears three times: all three are listed and
    take a gradient."""
    z = torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]],
                     dtype=torch.float64)
    h = torch.eye(2, dtype=torch.float64)
    w = z.T.contiguous().requires_grad_()
    listed = _spy(monkeypatch, kept_sets, "grads")
    logp = cutce.linear_log_probs(h, w, torch.tensor([1, 4]), top_k=2, impl="torch")
    logp.sum().backward()
    assert len(listed) == 1
    g = w.grad[:, 0]  # d logp_0 / dz_0j = [j == 1] - q_j over the kept {0, 1, 2, 4}
    assert (g[[0, 1, 2, 4]] != 0).all() and (g[[3, 5]] == 0).all()


@pytest.mark.parametrize("draw", range(6))
def test_top_p_candidates_and_the_sort_agree(gen, monkeypatch, draw):
    """Candidates in tiers: two (most rows' nucleus reaches past them and takes the sort), two
    then six (fewer sorted), the whole row (none sorted), none (all sorted): the same kept sets
    and values as the float64 truth."""
    n, d, v = 40, 6, 53
    h, w, b, t, opts = make_case(gen, n, d, v, torch.float64, exact=draw % 2 == 0)
    h, t = _unshift(h, t, opts)
    opts["top_k"], opts["top_p"] = None, (0.5, 0.8, 0.95)[draw % 3]
    up = torch.randn(h.shape[0], generator=gen, dtype=torch.float64), torch.randn(
        h.shape[0], generator=gen, dtype=torch.float64)
    ref = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    rl, re = reference(ref[0], ref[1], t, ref[2], **opts)
    rfin = torch.where(torch.isinf(rl), 0.0, rl)
    truth = [rl, re, *torch.autograd.grad((rfin * up[0]).sum() + (re * up[1]).sum(), ref)]
    sorted_rows = []
    for tiers in [(2,), (2, 6), (10**6,), ()]:
        sorts = _spy(monkeypatch, thresholds, "_top_p_sorted")
        monkeypatch.setattr(thresholds, "TOP_P_CANDIDATES", tiers)
        got = _grads(h, w, b, t, opts, up)
        sorted_rows.append(sum(x.numel() for x in sorts))
        assert torch.equal(torch.isneginf(got[0]), torch.isneginf(rl))
        fin = torch.isfinite(rl)
        assert rel_err(got[0][fin], rl[fin]) < 1e-10
        for a, r in zip(got[1:], truth[1:]):
            assert rel_err(a, r) < 1e-10
    assert sorted_rows[3] == h.shape[0] and sorted_rows[2] == 0
    assert 0 < sorted_rows[0] and sorted_rows[1] <= sorted_rows[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_listed_gradients_in_the_inputs_dtypes(gen, dtype):
    """From the lists: the gradients come back in the inputs' dtypes, finite and not 0."""
    h = torch.randn(9, 5, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(31, 5, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(31, generator=gen).to(dtype).requires_grad_()
    t = torch.randint(31, (9,), generator=gen)
    logp, ent = cutce.linear_log_probs(h, w, t, b, top_k=4, return_entropy=True, impl="torch")
    (torch.where(torch.isinf(logp), 0.0, logp).sum() + ent.sum()).backward()
    for x in (h, w, b):
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_list_stats_match_the_dense_sums(gen):
    """lse and pz from the listed logits against the masked chunk's, a row keeping nothing
    (a vocabulary slice) included: lse -inf, pz 0."""
    z = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    keep = torch.rand(6, 40, generator=gen) < 0.3
    keep[2] = False
    rows, cols = keep.nonzero(as_tuple=True)
    lse, pz = kept_sets.list_stats(keep.sum(1), rows, z[rows, cols], True)
    masked = z.masked_fill(~keep, float("-inf"))
    want = torch.logsumexp(masked, 1)
    q = torch.softmax(masked, 1).nan_to_num()
    assert torch.equal(torch.isneginf(lse), ~keep.any(1))
    live = keep.any(1)
    assert torch.allclose(lse[live], want[live], rtol=1e-14, atol=0)
    assert torch.allclose(pz, (q * z.masked_fill(~keep, 0.0)).sum(1), rtol=1e-13, atol=1e-13)
