"""gather.gathered_grads, the backward of a few logits per token (the stored teacher's K ids,
truncated top-k's kept ids): against index_add_ sums in float64, with ids repeated within and
across rows, each gradient on its own, and torch.library's checks of the custom op."""

from __future__ import annotations

import pytest
import torch

from cutce.backends.pytorch.gather import gathered_grads


def _case(gen, n=13, k=5, v=17, d=6):
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64)
    idx = torch.randint(v, (n, k), generator=gen)
    idx[:, 1] = idx[:, 0]  # the same id twice in a row
    g = torch.randn(n, k, generator=gen, dtype=torch.float64)
    return h, w, idx, g


def test_against_index_add(gen):
    h, w, idx, g = _case(gen)
    dh, dw, db = gathered_grads(h, w, idx, g, None, True, True, True)
    flat = idx.reshape(-1)
    assert torch.allclose(dh, (g[:, :, None] * w[idx]).sum(1), rtol=1e-13, atol=1e-13)
    want = torch.zeros_like(w).index_add_(0, flat, (g[:, :, None] * h[:, None, :]).reshape(-1, 6))
    assert torch.allclose(dw, want, rtol=1e-13, atol=1e-13)
    want_b = torch.zeros(w.shape[0], dtype=g.dtype).index_add_(0, flat, g.reshape(-1))
    assert torch.allclose(db, want_b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)])
def test_each_gradient_alone(gen, need):
    h, w, idx, g = _case(gen)
    full = gathered_grads(h, w, idx, g, None, True, True, True)
    got = gathered_grads(h, w, idx, g, None, *need)
    for asked, a, r in zip(need, got, full):
        assert torch.equal(a, r) if asked else a.numel() == 0


def test_float32_weight_in_bfloat16_coefficients(gen):
    """A 16-bit weight off CUDA runs in g's dtype (float32): no rounding of g."""
    h, w, idx, g = (x.float() if x.is_floating_point() else x for x in _case(gen))
    dh, dw, db = gathered_grads(h.bfloat16(), w.bfloat16(), idx, g, None, True, True, True)
    assert dh.dtype == dw.dtype == db.dtype == torch.float32


def test_opcheck(gen):
    h, w, idx, g = _case(gen)
    torch.library.opcheck(gathered_grads, (h, w, idx, g, None, True, True, True))
    torch.library.opcheck(gathered_grads, (h, w, idx, g, None, False, True, False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_bitwise_reproducible(gen):
    """bf16 weight on CUDA, ids crowded onto few rows (many sums per id): the same bits twice."""
    n, k, v, d = 4096, 64, 512, 256
    h = torch.randn(n, d, generator=gen).bfloat16().cuda()
    w = torch.randn(v, d, generator=gen).bfloat16().cuda()
    idx = torch.randint(v, (n, k), generator=gen).cuda()
    g = torch.randn(n, k, generator=gen).cuda()
    first = gathered_grads(h, w, idx, g, None, True, True, True)
    second = gathered_grads(h, w, idx, g, None, True, True, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[1].dtype == torch.bfloat16 and first[2].dtype == torch.float32


def test_ragged_bags(gen):
    """Flat ids with offsets (each token its own number of ids, one token none): the same as
    padding every token to the longest with coefficient 0."""
    h, w, idx, g = _case(gen)
    counts = torch.randint(0, 6, (h.shape[0],), generator=gen)
    counts[3] = 0
    live = torch.arange(5)[None, :] < counts[:, None]
    offsets = torch.cumsum(counts, 0) - counts
    got = gathered_grads(h, w, idx[live], g[live], offsets, True, True, True)
    want = gathered_grads(h, w, idx, torch.where(live, g, 0.0), None, True, True, True)
    assert all(torch.allclose(a, r, rtol=1e-13, atol=1e-13) for a, r in zip(got, want))
