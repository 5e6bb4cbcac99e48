"""The backward's memory plan at real sizes, without allocating them (meta tensors).

The plan is a contract: peak memory <= gradients + the workspace every recompute backward has
(cutce.engine.chunks.workspace_floor), and a
chunk's dz kept in dC's unwritten rows must never overlap rows a GEMM has written or will write
for it.
"""

import pytest
import torch

from cutce.backends.triton import configs, workspace
from cutce.engine import chunks

KC = configs.HOPPER  # the GPU's values
SHAPES = [(8192, 2304, 256000), (8192, 4096, 128256), (65536, 2304, 256000),
          (16384, 3584, 152064), (3001, 8192, 131071), (1024, 2304, 256000), (300, 64, 1000)]


@pytest.fixture(autouse=True)
def gpu_plan(monkeypatch):
    monkeypatch.setattr(configs, "interpreting", lambda: False)  # the GPU's plan, on any machine


def _budget(n, v, d):
    return chunks.workspace_floor(n, v, d, torch.bfloat16)


def _sizes(n, n_cls, v, d, tail, gather):
    return chunks.recompute_chunks(n, n_cls, v, d, torch.bfloat16, True, True, True, tail, gather,
                                   256, KC.min_chunk_v, KC.max_chunk_v, _budget(n, v, d))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kept", [1.0, 0.07])
def test_plan_fits_budget(shape, kept):
    n, d, v = shape
    n_cls = max(1, int(kept * v))
    gather = kept < 1
    cn, cv = _sizes(n, n_cls, v, d, not gather, gather)
    assert 1 <= cn <= n and cv % 256 == 0 and cv >= min(KC.min_chunk_v, cv)
    used = cn * (d // 2) * 4 + cn * cv * 2 + gather * cv * 2 * d * 2
    # the budget, or the smallest plan there is (one token block x the narrowest chunk)
    assert used <= _budget(n, v, d) or (cn <= 128 and cv == KC.min_chunk_v), (cn, cv, used)


@pytest.mark.parametrize("shape", [(8192, 2304, 256000), (8192, 4096, 128256), (300, 64, 1000)])
def test_one_token_chunk_at_the_bench_shapes(shape):
    n, d, v = shape
    cn, _ = _sizes(n, v, v, d, True, False)
    assert cn == n  # no dC accumulation passes, and dz may live in dC's unwritten rows


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_dz_in_unwritten_rows_never_overlaps(shape, monkeypatch):
    n, d, v = shape
    carved = []
    real = workspace._carve

    def spy(buf, end, rows, cols, dtype):
        view, start = real(buf, end, rows, cols, dtype)
        carved.append((start, rows * cols * 2))
        return view, start
    monkeypatch.setattr(workspace, "_carve", spy)
    dw = torch.empty((v, d), dtype=torch.bfloat16, device="meta")
    _, cv = _sizes(n, v, v, d, True, False)
    space = workspace.DzWorkspace(n, cv, torch.bfloat16, "meta", dw, 256, KC)
    row_bytes = d * 2
    c0 = 0
    while c0 < v:
        before = len(carved)
        dz, w = space.next(c0, v, n)
        assert dz.shape == (n, w) and w > 0
        if len(carved) > before:  # this chunk's dz lives in dC's rows past the chunk's own
            start, nbytes = carved[-1]
            assert start >= (c0 + w) * row_bytes and start + nbytes <= v * row_bytes
            assert w <= KC.max_chunk_v
        c0 += w
    assert c0 == v and len(carved) >= v // KC.max_chunk_v // 2, len(carved)
