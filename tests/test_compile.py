"""torch.compile(fullgraph=True) of a function calling linear_cross_entropy: no graph break on CPU,
forward and backward equal to eager. The aot_eager backend traces exactly what inductor would
(dynamo + AOTAutograd) in seconds; inductor itself would take minutes on a small CPU."""

from __future__ import annotations

import pytest
import torch

from cutce import linear_cross_entropy
from reference import make_inputs

KW = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0, logit_scale=0.7, shift=True,
          chunk_bytes=11000, return_lse=True)  # 3 chunks of 13 rows


def _step(h, w, t, b, tw):
    loss, lse = linear_cross_entropy(h, w, t, b, token_weights=tw, **KW)
    return loss + 0.01 * lse.square().mean(), lse


def _fwd_bwd(fn, h, w, t, b, tw):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    out, lse = fn(leaves[0], leaves[1], t, leaves[2], tw)
    out.backward()
    return [out.detach(), lse.detach()] + [x.grad for x in leaves]


def test_compile_fullgraph_matches_eager(gen):
    torch._dynamo.reset()
    h, w, t, b, tw = make_inputs(gen, (2, 19), 24, 67, bias=True, token_weights=True, ignore_frac=0.2)
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    got = _fwd_bwd(compiled, h, w, t, b, tw)  # fullgraph=True raises on any graph break
    ref = _fwd_bwd(_step, h, w, t, b, tw)
    for a, r in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    # Same shapes, bad targets: the in-graph check (no .item()) still refuses them.
    bad = t.clone()
    bad[1, 5] = 67
    with pytest.raises(RuntimeError, match="targets outside"):
        compiled(h, w, bad, b, tw)


def test_compile_dynamic_shapes_and_float_options_no_recompile(gen):
    """dynamic=True: new sequence lengths and new label_smoothing / z_loss values reuse the graph
    (the chunk loop is an opaque custom op, so N is not specialized; floats stay symbolic)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()

    def f(h, w, t, ls, zl):
        return linear_cross_entropy(h, w, t, label_smoothing=ls, z_loss=zl, softcap=5.0, chunk_bytes=3000)

    def fwd_bwd(fn, h, w, t, ls, zl):
        h, w = (x.detach().clone().requires_grad_() for x in (h, w))
        loss = fn(h, w, t, ls, zl)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter, dynamic=True)
    frames = []
    for seq, ls, zl in ((19, 0.1, 1e-3), (26, 0.2, 2e-3)):
        h, w, t, _, _ = make_inputs(gen, (2, seq), 16, 53, ignore_frac=0.1)
        got, ref = fwd_bwd(compiled, h, w, t, ls, zl), fwd_bwd(f, h, w, t, ls, zl)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0]  # the second call did not recompile
