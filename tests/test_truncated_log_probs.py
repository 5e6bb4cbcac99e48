"""linear_log_probs with top_k / top_p / min_p against the float64 truncated distribution of
materialized logits (tests/truncated_cases.py): values, -inf outside the kept set, gradients of
hidden, weight and bias, exact ties and near-ties at the boundaries, and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

import cutce
from reference import rel_err
from truncated_cases import kept_set, make_case, reference, transformed

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TRUNC = ("top_k", "top_p", "min_p")
TRANSFORM = ("temperature", "softcap", "logit_scale", "shift")


def _run(h, w, b, t, opts, up=None, dtype=None):
    """cutce's and the reference's (logp, entropy, dh, dw, db) under a random upstream gradient
    of both outputs (none through the -inf of dropped tokens)."""
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b) if x is not None]
    logp, ent = cutce.linear_log_probs(*leaves[:2], t, leaves[2] if b is not None else None,
                                       return_entropy=True, impl="torch", **opts)
    if up is None:
        g = torch.Generator().manual_seed(7)
        up = torch.randn(logp.shape, generator=g), torch.randn(ent.shape, generator=g)
    finite = torch.where(torch.isinf(logp), 0.0, logp)
    got = [logp, ent, *torch.autograd.grad((finite * up[0]).sum() + (ent * up[1]).sum(), leaves)]
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    rlogp, rent = reference(ref_leaves[0], ref_leaves[1], t,
                            ref_leaves[2] if b is not None else None, **opts)
    rfinite = torch.where(torch.isinf(rlogp), 0.0, rlogp)
    want = [rlogp, rent, *torch.autograd.grad(
        (rfinite * up[0].double()).sum() + (rent * up[1].double()).sum(), ref_leaves)]
    return got, want


def _check(got, want, tol):
    logp, rlogp = got[0], want[0]
    # the same tokens are dropped (-inf), and only those
    assert torch.equal(torch.isneginf(logp), torch.isneginf(rlogp))
    assert not torch.isnan(logp).any() and not torch.isposinf(logp).any()
    fin = torch.isfinite(rlogp)
    assert rel_err(logp[fin], rlogp[fin]) < tol
    for name, a, r in zip(("entropy", "dh", "dw", "db"), got[1:], want[1:]):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) < tol, name


@pytest.mark.parametrize("exact", [True, False], ids=["grid", "gauss"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(37, 23, 61), (5, 7, 129), (16, 9, 40)])
@pytest.mark.parametrize("draw", range(3))
def test_matches_truncated_reference(gen, draw, shape, dtype, exact):
    """Random options (each truncation on or off, temperature, softcap, logit_scale, bias,
    shift, ignored positions) on ragged shapes."""
    n, d, v = shape
    h, w, b, t, opts = make_case(gen, n, d, v, dtype, bias=draw != 1, exact=exact)
    got, want = _run(h, w, b, t, opts)
    _check(got, want, 1e-10 if dtype == torch.float64 else 2e-5)
    assert got[0].dtype == dtype and got[1].dtype == dtype


@pytest.mark.parametrize("draw", range(3))
def test_bfloat16_inputs(gen, draw):
    """bf16 inputs: float32 inside, gradients rounded to bf16 (PyTorch's bf16-path tolerance)."""
    h, w, b, t, opts = make_case(gen, 21, 16, 77, torch.bfloat16, exact=draw == 0)
    got, want = _run(h, w, b, t, opts)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    _check(got, want, 1.6e-2)


def _rows(*logits):
    """hidden = identity rows, weight = the logits: z = exactly the given rows."""
    z = torch.tensor(logits, dtype=torch.float64)
    return torch.eye(z.shape[0], dtype=torch.float64), z.T.contiguous()


def test_top_k_keeps_ties():
    # k = 2: the second largest value, 2.0, appears three times: all kept (4 tokens)
    h, w = _rows([3.0, 2.0, 2.0, 1.0, 2.0, 0.0])
    logp = torch.cat([cutce.linear_log_probs(h, w, torch.tensor([j]), top_k=2) for j in range(6)])
    tot = math.exp(3.0) + 3 * math.exp(2.0)
    want = [math.exp(3.0) / tot] + [math.exp(2.0) / tot] * 2 + [0.0] + [math.exp(2.0) / tot, 0.0]
    assert logp.exp().tolist() == pytest.approx(want, rel=1e-12)
    assert torch.isneginf(logp[[3, 5]]).all()


def test_top_p_keeps_the_crossing_token_and_its_ties():
    # softmax of [0, 0, log 2, log 4] = [1, 1, 2, 4] / 8. Ascending cumulative mass:
    # 1/8, 2/8 (the tie), 4/8, 1. top_p = 0.8: drop mass <= 0.2 -> only the first 0.0 would go
    # by position, but it ties with the second (mass 2/8 > 0.2): both kept.
    z = [0.0, 0.0, math.log(2.0), math.log(4.0)]
    h, w = _rows(z)
    logp = torch.stack([cutce.linear_log_probs(h, w, torch.tensor([j]), top_p=0.8)[0]
                        for j in range(4)])
    assert torch.isfinite(logp).all()
    # top_p = 0.7: drop mass <= 0.3: both 0.0 go (group mass 2/8), log 2 crosses and stays
    logp = torch.stack([cutce.linear_log_probs(h, w, torch.tensor([j]), top_p=0.7)[0]
                        for j in range(4)])
    assert torch.isinf(logp[:2]).all()
    assert logp[2:].exp().tolist() == pytest.approx([1 / 3, 2 / 3], rel=1e-12)
    # a tiny top_p keeps the largest only
    assert cutce.linear_log_probs(h, w, torch.tensor([3]), top_p=1e-9).item() == 0.0


def test_top_p_drops_mass_equal_to_the_line():
    """vLLM drops a prefix whose cumulative mass is <= 1 - top_p: at equality, dropped. The
    three tied zeros hold mass m >= 1/2 and top_p = 1 - m, so 1 - top_p == m exactly."""
    z = torch.tensor([0.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    m = torch.softmax(z, 0).cumsum(0)[2].item()  # the op's own arithmetic on this row
    h, w = _rows(z.tolist())
    assert 1.0 - (1.0 - m) == m
    logp = torch.cat([cutce.linear_log_probs(h, w, torch.tensor([j]), top_p=1.0 - m)
                      for j in range(4)])
    assert torch.isneginf(logp[:3]).all() and logp[3].item() == 0.0
    logp = cutce.linear_log_probs(h, w, torch.tensor([0]), top_p=1.0 - m + 1e-9)
    assert torch.isfinite(logp).all()


def test_min_p_compares_probabilities():
    # p / p_max = exp(z - z_max): 1, e^-1, e^-2, e^-3; min_p = 0.2 keeps the first two
    h, w = _rows([0.0, -1.0, -2.0, -3.0])
    keep = [bool(torch.isfinite(cutce.linear_log_probs(h, w, torch.tensor([j]), min_p=0.2)))
            for j in range(4)]
    assert keep == [True, True, False, False]
    # min_p = 1: only the maximum (and its ties)
    h, w = _rows([1.0, 1.0, 0.5])
    keep = [bool(torch.isfinite(cutce.linear_log_probs(h, w, torch.tensor([j]), min_p=1.0)))
            for j in range(3)]
    assert keep == [True, True, False]


def test_order_min_p_then_top_k_then_top_p(gen):
    """The three together equal the reference's order on rows with many ties, and differ from
    applying top-p before top-k (so the order is tested, not only each step)."""
    h, w, b, t, _ = make_case(gen, 30, 8, 50, torch.float64)
    opts = dict(top_k=6, top_p=0.6, min_p=0.02)
    got, want = _run(h, w, b, t, opts)
    _check(got, want, 1e-10)
    z = transformed(h.reshape(-1, 8), w, b)
    assert not torch.equal(kept_set(z, 6, 0.6, 0.02), kept_set(z, None, 0.6, 0.02)
                           & kept_set(z, 6, None, None))


def test_dropped_tokens_get_no_gradient():
    h, w = _rows([3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0])
    h, w = h.requires_grad_(), w.requires_grad_()
    t = torch.tensor([3, 3])  # dropped in row 0, the top token in row 1
    logp = cutce.linear_log_probs(h, w, t, top_k=2)
    assert torch.isneginf(logp[0]) and torch.isfinite(logp[1])
    logp[1].backward()  # through the kept token only
    assert h.grad[0].abs().sum() == 0
    # a -inf output's own gradient is zero, not NaN
    h.grad = w.grad = None
    logp = cutce.linear_log_probs(h, w, t, top_k=2)
    logp.backward(torch.ones(2))
    assert torch.isfinite(h.grad).all() and h.grad[0].abs().sum() == 0


def test_sampled_log_probs_join_dropped_tokens(gen):
    """The variant for loss code that takes no -inf (cutce.trl): a dropped token joins its kept
    set; kept tokens get linear_log_probs' values. Against float64 materialized logits."""
    from cutce.truncated_log_probs import sampled_log_probs

    h, w, b, t, _ = make_case(gen, 40, 6, 33, torch.float64, exact=False)
    h, t = h.reshape(-1, 6), t.reshape(-1)
    opts = dict(temperature=0.8, softcap=3.0)
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    logp, ent = sampled_log_probs(*leaves[:2], t, leaves[2], top_k=3, top_p=0.9,
                                  return_entropy=True, **opts)
    plain = cutce.linear_log_probs(h, w, t, b, return_entropy=True, top_k=3, top_p=0.9, **opts)
    ref = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    z = transformed(*ref, **opts)
    valid = t != -100
    keep = kept_set(z, 3, 0.9) | torch.nn.functional.one_hot(t.clamp(min=0), z.shape[1]).bool()
    lsm = z.masked_fill(~keep, -math.inf).log_softmax(-1)
    rlogp = torch.where(valid, lsm.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    rent = torch.where(valid, -(lsm.exp() * lsm.masked_fill(~keep, 0.0)).sum(-1), 0.0)
    dropped = torch.isneginf(plain[0])
    assert dropped.any() and (valid & ~dropped).any() and torch.isfinite(logp).all()
    assert torch.equal(logp[~dropped], plain[0][~dropped])
    assert torch.equal(ent[~dropped], plain[1][~dropped])
    assert rel_err(logp, rlogp) < 1e-12 and rel_err(ent, rent) < 1e-12
    got = torch.autograd.grad(logp.sum() + 0.3 * ent.sum(), leaves)
    want = torch.autograd.grad(rlogp.sum() + 0.3 * rent.sum(), ref)
    assert all(rel_err(a, r) < 1e-10 for a, r in zip(got, want))


def test_off_settings_are_the_untruncated_path(gen):
    h = torch.randn(9, 8, generator=gen)
    w = torch.randn(30, 8, generator=gen)
    t = torch.randint(30, (9,), generator=gen)
    plain = cutce.linear_log_probs(h, w, t, return_entropy=True, temperature=0.9)
    for off in (dict(top_p=1.0), dict(min_p=0.0), dict(top_p=1.0, min_p=0.0)):
        got = cutce.linear_log_probs(h, w, t, return_entropy=True, temperature=0.9, **off)
        assert all(torch.equal(a, b) for a, b in zip(got, plain))
    # top_k >= V truncates nothing (another path: equal up to rounding)
    got = cutce.linear_log_probs(h, w, t, return_entropy=True, temperature=0.9, top_k=30)
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(got, plain))


def test_chunks_agree(gen):
    """Token chunks of a few rows (the backward masks with the forward's thresholds)."""
    from cutce.backends.pytorch import truncated
    from cutce.validate import make_options

    h, w, b, t, _ = make_case(gen, 40, 6, 33, torch.float64)
    opts = make_options(torch.float64, reduction="none", temperature=0.8, need_entropy=True,
                        top_k=4, top_p=0.9, min_p=0.01)
    outs = []
    for chunk in (None, 33 * 8 * truncated._TEMPS_TOP_P * 3):  # one chunk, then 3 rows a chunk
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lse, zt, pz, kept = truncated.truncated_parts(hh.reshape(-1, 6), ww, b, t.reshape(-1),
                                                      opts, chunk_bytes=chunk)
        (lse.sum() + (pz * 0.3).sum() - zt.sum()).backward()
        outs.append([lse, pz, kept, hh.grad, ww.grad])
    for a, r in zip(*outs):
        assert torch.equal(a, r) if a.dtype == torch.bool else rel_err(a, r) < 1e-12


def test_compile_aot_eager(gen):
    """One opaque op per direction: no graph break, the eager values and gradients."""
    h = torch.randn(8, 4, generator=gen)
    w, b = torch.randn(17, 4, generator=gen), torch.randn(17, generator=gen)
    t = torch.randint(17, (8,), generator=gen)

    def f(h):
        logp, ent = cutce.linear_log_probs(h, w, t, b, top_k=3, top_p=0.9, min_p=0.05,
                                           return_entropy=True)
        return logp, ent, torch.where(torch.isinf(logp), 0.0, logp).sum() + ent.sum()

    out = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        hh = h.clone().requires_grad_()
        logp, ent, total = fn(hh)
        total.backward()
        out.append((logp, ent, hh.grad))
    for a, r in zip(*out):
        assert torch.equal(torch.isinf(a), torch.isinf(r))
        assert rel_err(a[torch.isfinite(a)], r[torch.isfinite(r)]) < 1e-6


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=0), "top_k: expected None or a positive int"),
    (dict(top_k=-1), "top_k: expected None or a positive int"),
    (dict(top_k=2.0), "top_k: expected None or a positive int"),
    (dict(top_k=True), "top_k: expected None or a positive int"),
    (dict(top_p=0.0), "top_p: expected a number > 0"),
    (dict(top_p=1.5), "top_p: expected a number <= 1"),
    (dict(top_p=float("nan")), "top_p: expected a finite number"),
    (dict(top_p="0.9"), "top_p: expected a finite number"),
    (dict(min_p=-0.1), "min_p: expected a number >= 0"),
    (dict(min_p=2.0), "min_p: expected a number <= 1"),
    (dict(top_k=3, return_stats=True), "return_stats: expected False with top_k/top_p/min_p"),
    (dict(top_p=0.5, impl="triton"), "impl: expected 'auto' or 'torch' for top_k/top_p/min_p"),
    (dict(top_p=0.5, impl="cuda"), "impl: expected one of"),
])
def test_bad_arguments(kw, match):
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        cutce.linear_log_probs(h, w, t, **kw)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_token_log_probs_passes_truncation(family):
    """cutce.transformers.token_log_probs: the same kept set and values as the model's own
    logits (softcap included for Gemma 2) truncated by the reference."""
    pytest.importorskip("transformers")
    from hf_models import T, VOCAB, make_model

    from cutce import transformers as ct

    model = make_model(family)
    ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    trunc = dict(top_k=40, top_p=0.9, min_p=0.01)
    logp, ent = ct.token_log_probs(model, ids, temperature=0.8, return_entropy=True, **trunc)
    with torch.no_grad():
        z = model(input_ids=ids).logits[:, :-1].double().reshape(-1, VOCAB) / 0.8
    keep = kept_set(z, **trunc)
    lsm = z.masked_fill(~keep, -math.inf).log_softmax(-1)
    want = lsm.gather(-1, ids[:, 1:].reshape(-1, 1))[:, 0].reshape(2, T - 1)
    assert torch.equal(torch.isneginf(logp), torch.isneginf(want))
    assert torch.isneginf(want).any() and torch.isfinite(want).any()
    fin = torch.isfinite(want)
    assert rel_err(logp[fin], want[fin]) < 1e-5
    went = -(lsm.exp() * lsm.masked_fill(~keep, 0.0)).sum(-1).reshape(2, T - 1)
    assert rel_err(ent, went) < 1e-5
    with pytest.raises(ValueError, match="top_p: expected"):
        ct.token_log_probs(model, ids, top_p=0.0)


def test_example_runs():
    """examples/truncated_log_probs.py: rollouts of a truncated sampler, scored by cutce."""
    pytest.importorskip("transformers")
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(root / "examples" / "truncated_log_probs.py")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout
