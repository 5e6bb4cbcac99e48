"""The truncated torch path's CUDA arithmetic for 16-bit inputs, emulated on the CPU: logits from
the 16-bit operands with float32 results (the same values as today's upcast GEMM), the logit
gradient rounded to the inputs' dtype for the backward's GEMMs, collected over several chunks.
Its gradients must stay within 1.5x the error of PyTorch's own 16-bit path against float64."""

from __future__ import annotations

import math

import pytest
import torch

import cutce
from cutce.backends.pytorch import common, kept_sets, thresholds, truncated
from reference import rel_err
from truncated_cases import boundary_margin, grid, kept_set, reference, transformed

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

N, D, V = 50, 24, 160
CASES = [dict(top_k=5), dict(top_p=0.9), dict(min_p=0.05), dict(top_k=12, top_p=0.8),
         dict(min_p=0.02, top_p=0.95, softcap=4.0, logit_scale=1.25)]


def _emulate_cuda(monkeypatch):
    monkeypatch.setattr(common, "mixed_ok", lambda t: t.dtype in (torch.float16, torch.bfloat16))


def _cutce(leaves, t, opts, up):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    h, w, b = leaves
    logp, ent = cutce.linear_log_probs(h, w, t, b, return_entropy=True, impl="torch",
                                       temperature=0.9, **opts)
    fin = torch.where(torch.isinf(logp), 0.0, logp)
    return [logp, ent, *torch.autograd.grad((fin * up[0]).sum() + (ent * up[1]).sum(), leaves)]


def _truth_and_lowp(leaves, t, opts, up):
    """float64 (logp, ent, dh, dw, db), and PyTorch's 16-bit path's (dh, dw, db): logits in the
    inputs' dtype, the truncated log-softmax in float32 over the float64 kept set."""
    trunc = {k: opts[k] for k in ("top_k", "top_p", "min_p") if k in opts}
    form = dict(logit_scale=opts.get("logit_scale", 1.0), softcap=opts.get("softcap"),
                temperature=0.9)
    ref = [x.detach().double().requires_grad_() for x in leaves]
    logp, ent = reference(ref[0], ref[1], t, ref[2], **form, **trunc)
    fin = torch.where(torch.isinf(logp), 0.0, logp)
    truth = [logp, ent, *torch.autograd.grad(
        (fin * up[0].double()).sum() + (ent * up[1].double()).sum(), ref)]
    keep = kept_set(transformed(*(x.detach() for x in ref), **form), **trunc)
    low = [x.detach().clone().requires_grad_() for x in leaves]
    z = transformed(*low, **form).float()
    lsm = z.masked_fill(~keep, -math.inf).log_softmax(-1)
    lp = lsm.gather(-1, t[:, None])[:, 0]
    le = -(lsm.exp() * lsm.masked_fill(~keep, 0.0)).sum(-1)
    lp = torch.where(torch.isinf(lp), 0.0, lp)
    lowp = torch.autograd.grad((lp * up[0]).sum() + (le * up[1]).sum(), low)
    return truth, lowp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_mixed_gradients_within_the_16_bit_path(gen, monkeypatch, case, dtype):
    opts = CASES[case]
    h = (2.0 * torch.randn(N, D, generator=gen)).to(dtype)
    w = (torch.randn(V, D, generator=gen) / D**0.5).to(dtype)
    b = (0.5 * torch.randn(V, generator=gen)).to(dtype)
    t = torch.randint(V, (N,), generator=gen)
    up = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    plain = _cutce((h, w, b), t, opts, up)
    _emulate_cuda(monkeypatch)
    # a few rows a chunk, several chunks a group, a ragged last group
    monkeypatch.setitem(truncated.CHUNK_BYTES, "cpu", 4 * V * 4 * truncated._TEMPS_TOP_P)
    mixed = _cutce((h, w, b), t, opts, up)
    # the forward's products are the same values (the chunks' sums may go another order)
    assert torch.equal(torch.isneginf(mixed[0]), torch.isneginf(plain[0]))
    fin = torch.isfinite(plain[0])
    assert rel_err(mixed[0][fin], plain[0][fin]) < 1e-6 and rel_err(mixed[1], plain[1]) < 1e-6
    truth, lowp = _truth_and_lowp((h, w, b), t, opts, up)
    assert torch.equal(torch.isneginf(mixed[0]), torch.isneginf(truth[0]))
    for name, m, low, r in zip(("dh", "dw", "db"), mixed[2:], lowp, truth[2:]):
        assert m.dtype == dtype, name
        err, bound = rel_err(m, r), 1.5 * rel_err(low, r)
        assert err <= bound, f"{name}: expected an error <= {bound:.3g}, got {err:.3g}"


def test_group_rows_are_whole_chunks():
    """The backward's groups hold whole forward chunks (the same logits' bits), within the
    budget beside the chunk's own temporaries."""
    from cutce.validate import make_options

    opts = make_options(torch.bfloat16, reduction="none", need_entropy=True, top_k=4)
    for n, v, budget in ((1000, 151936, 2**30), (37, 100, 6000), (5, 100, 10**6)):
        cfg = truncated.make_cfg(opts, budget)
        rows = truncated.chunk_rows(n, v, torch.float32, cfg, torch.device("cuda"))
        group = truncated._group_rows(n, v, rows, cfg, torch.device("cuda"))
        assert group % rows == 0 and rows <= group <= max(n, rows), (n, v, rows, group)
        if group > rows:
            assert rows * v * 4 * truncated._BACKWARD_TEMPS + group * v * 2 <= budget


CUDA_CASES = [dict(top_k=5), dict(top_k=64), dict(top_p=0.9), dict(top_p=0.5, min_p=0.01),
              dict(min_p=0.05), dict(top_k=64, top_p=0.8, softcap=4.0)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("listed", [True, False], ids=["lists", "recompute"])
@pytest.mark.parametrize("case", range(len(CUDA_CASES)))
def test_cuda_within_the_16_bit_path(gen, monkeypatch, case, listed):
    """The real CUDA path (16-bit GEMMs with float32 results, the backward from the lists of
    kept ids or the recompute, top-p past its candidates), in several chunks and groups. Grid
    inputs: the logits are exact in float32, so top-k's ties are the truth's; top-p and min-p
    draw again near a boundary."""
    opts = CUDA_CASES[case]
    trunc = {k: opts[k] for k in ("top_k", "top_p", "min_p") if k in opts}
    n, d, v = 200, 32, 400
    for _ in range(20):
        h, w, b = grid(gen, n, d), grid(gen, v, d), grid(gen, v)
        z = transformed(h, w, b, opts.get("logit_scale", 1.0), opts.get("softcap"), 0.9)
        if boundary_margin(z, **trunc) > 1e-5:
            break
    h, w, b = (x.bfloat16().cuda() for x in (h, w, b))
    t = torch.randint(v, (n,), generator=gen).cuda()
    up = torch.randn(n, generator=gen).cuda(), torch.randn(n, generator=gen).cuda()
    monkeypatch.setitem(truncated.CHUNK_BYTES, "cuda", 24 * v * 4 * truncated._TEMPS_TOP_P)
    monkeypatch.setattr(thresholds, "TOP_P_CANDIDATES", (16, 48))
    if not listed:
        monkeypatch.setattr(kept_sets, "IDS_PER_TOKEN", 0)
    got = _cutce((h, w, b), t, opts, up)
    truth, lowp = _truth_and_lowp((h, w, b), t, opts, up)
    assert torch.equal(torch.isneginf(got[0]), torch.isneginf(truth[0]))
    fin = torch.isfinite(truth[0])
    assert rel_err(got[0][fin], truth[0][fin]) < 1e-5
    for name, m, low, r in zip(("dh", "dw", "db"), got[2:], lowp, truth[2:]):
        assert m.dtype == torch.bfloat16, name
        err, bound = rel_err(m, r), 1.5 * rel_err(low, r)
        assert err <= bound, f"{name}: expected an error <= {bound:.3g}, got {err:.3g}"
