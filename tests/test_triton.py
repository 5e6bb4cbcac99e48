"""The Triton path against the float64 oracle.

Without a GPU the real kernels run through Triton's interpreter (TRITON_INTERPRET=1, CPU
tensors) at small ragged shapes; on a GPU the same tests run on CUDA tensors, and
test_triton_gpu.py adds real sizes, determinism, N*V > 2**31 and torch.compile
(``bash benchmarks/device.sh tests``).
Errors are measured against float64 and compared with PyTorch's own low-precision path's error.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # every test here runs the Triton path

import cutce  # noqa: E402
from cutce.backends.triton import ops  # noqa: E402
from cutce.backends.pytorch import ce as torch_impl
from cutce.engine.options import Options  # noqa: E402
from cutce.backends.triton import configs  # noqa: E402
from cutce.backends.triton import forward as tfwd  # noqa: E402
from reference import make_inputs, oracle, rel_err  # noqa: E402
from triton_cases import OPTION_SETS, compare, compare_option_set, to_dev  # noqa: E402
from triton_support import DEV  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned")  # conftest.py


@pytest.fixture(autouse=True)
def recompute(monkeypatch):
    """These tests check the recompute kernels: per-token calls whose logits would fit the
    budget keep them instead (test_kept_logits.py checks that strategy on the same cases)."""
    from cutce.engine import planner
    monkeypatch.setattr(planner, "may_keep", lambda *a: False)


def workspace_chunks(monkeypatch, sizes):
    """The backward's (chunk_n, chunk_v) come from ``sizes(n)``: the budget-sized workspace's
    path, which the default budget skips where it holds the preferred recompute chunk (on the
    GPU at these sizes; test_log_probs.py checks that path)."""
    from cutce.backends.triton import backward
    from cutce.engine import planner
    monkeypatch.setattr(planner, "recompute_chunk_bytes", lambda p: float("inf"))
    monkeypatch.setattr(backward, "workspace_chunks", lambda n, *a: sizes(n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_options_match_oracle(gen, dtype, name):
    compare_option_set(gen, dtype, name)


def test_shift_batched_ragged(gen):
    h, w, t, b, tw = make_inputs(gen, (3, 17), 64, 257, torch.bfloat16, bias=True, token_weights=True,
                                 ignore_frac=0.1)
    h, w, t, b, tw = to_dev(DEV, h, w, t, b, tw)
    compare(h, w, t, b, tw, dict(shift=True, softcap=4.0), with_lse=True)


def test_vocab_splits_agree(gen):
    """The forward's split-and-combine gives the same values for any split count."""
    h, w, t, b, _ = make_inputs(gen, 45, 40, 300, torch.float32, bias=True, requires_grad=False)
    h, w, t, b = to_dev(DEV, h, w, t, b)
    one = tfwd.forward(h, w, b, t, 1.0, 2.0, 1.0, True, True, n_splits=1)
    for s in (3, 7):
        many = tfwd.forward(h, w, b, t, 1.0, 2.0, 1.0, True, True, n_splits=s)
        for a, c in zip(one[:4], many[:4]):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_target_logit_kernel_matches_the_logits(gen):
    """zt from the gather kernel equals the target's entry of the float32 logits (summation
    order aside), scale, softcap and temperature applied; 0 for ignored and out-of-range
    targets."""
    h, w, t, b, _ = make_inputs(gen, 53, 40, 211, torch.bfloat16, bias=True)
    t[:5] = torch.tensor([-100, 211, 500, 0, 210])
    h, w, t, b = to_dev(DEV, h, w, t, b)
    zt = tfwd.forward(h, w, b, t, 0.9, 3.0, 1.1, False, False)[1]
    z = 3.0 * torch.tanh((h.float() @ w.float().T + b.float()) * 0.9 / 3.0) * 1.1
    valid = (t >= 0) & (t < w.shape[0])
    want = torch.where(valid, z.gather(1, torch.where(valid, t, 0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(zt, want, rtol=1e-5, atol=1e-5)
    assert (zt[:3] == 0).all()


def test_entropy_part_matches_torch(gen):
    """pz = sum_j p_j z_j and its gradient (used by linear_log_probs) agree with the torch path."""
    h, w, t, b, _ = make_inputs(gen, 33, 24, 90, torch.float32, bias=True)
    h, w, t, b = to_dev(DEV, h, w, t, b)
    opts = Options(need_entropy=True, softcap=4.0, temperature=0.7, logit_scale=1.2)
    res = []
    for impl in (ops, torch_impl):
        hh, ww, bb = [x.detach().clone().requires_grad_() for x in (h, w, b)]
        lse, zt, _, pz = impl.linear_lse_parts(hh, ww, bb, t, opts)
        gs = torch.randn(3, lse.numel(), generator=torch.Generator().manual_seed(1)).to(DEV)
        total = (lse * gs[0] + zt * gs[1] + pz * gs[2]).sum()
        res.append([lse, zt, pz, *torch.autograd.grad(total, (hh, ww, bb))])
    for a, c in zip(*res):
        assert rel_err(a, c) < 1e-5


def _loss_and_grads(h, w, t, b, **opts):
    hh, ww, bb = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    loss = cutce.linear_cross_entropy(hh, ww, t, bb, impl="triton", **opts)
    return [loss, *torch.autograd.grad(loss, (hh, ww, bb))]


def test_tma_and_pointer_loads_agree(gen, kernel_config):
    """Descriptor (bulk-copy) loads and pointer loads feed the same tiles: same results."""
    h, w, t, b, _ = make_inputs(gen, 45, 64, 300, torch.bfloat16, bias=True)
    h, w, t, b = to_dev(DEV, h, w, t, b)
    assert configs.use_tma(configs.current(DEV), h, w) \
        or DEV == "cuda" and torch.cuda.get_device_capability()[0] < 9
    out = []
    for tma in (True, False):
        with configs.override(tma=tma):
            out.append(_loss_and_grads(h, w, t, b, softcap=5.0, label_smoothing=0.1))
    for a, c in zip(*out):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
    kernel_config(tma=True)
    compare(h, w, t, b, None, dict(softcap=5.0), with_lse=True)


def test_dz_in_unwritten_weight_grad_rows(gen, monkeypatch, kernel_config):
    """Wide chunks keep their dz in the rows of dC not written yet; the last chunks use the
    separate workspace. Both kinds of chunk, and the hand-over, give the oracle's gradients."""
    from cutce.backends.triton import workspace
    carved = []
    real = workspace._carve
    monkeypatch.setattr(workspace, "_carve", lambda *a: carved.append(a[2:4]) or real(*a))
    bv = configs.current(DEV).tile("bwd", torch.bfloat16).block_v
    kernel_config(max_chunk_v=3 * bv)
    workspace_chunks(monkeypatch, lambda n: (n, bv))
    v = 9 * bv + 17
    h, w, t, b, _ = make_inputs(gen, 41, 64, v, torch.bfloat16, bias=True)
    h, w, t, b = to_dev(DEV, h, w, t, b)
    compare(h, w, t, b, None, dict(z_loss=1e-3), with_lse=True)
    assert carved and len(carved) < triton.cdiv(v, bv), carved


@pytest.mark.parametrize("chunk_n", [16, 29])
def test_token_chunks_split_accumulator(gen, monkeypatch, chunk_n):
    """Token chunks: half of dE's float32 accumulator lives in dE's own rows, dC is accumulated
    over the chunks; ragged last chunk."""
    bv = configs.current(DEV).tile("bwd", torch.bfloat16).block_v
    workspace_chunks(monkeypatch, lambda n: (min(chunk_n, n), 2 * bv))
    h, w, t, b, _ = make_inputs(gen, 70, 48, 5 * bv + 3, torch.bfloat16, bias=True)
    h, w, t, b = to_dev(DEV, h, w, t, b)
    compare(h, w, t, b, None, dict(label_smoothing=0.1), with_lse=True)


@pytest.mark.parametrize("gathered", [False, True])
def test_token_chunks_sum_dc_in_float32(gen, monkeypatch, kernel_config, gathered):
    """Many token chunks: with the default budget the recompute backward sums dC in a float32
    accumulator, so its error stays below the per-chunk 16-bit sum's (memory_budget=0)."""
    bv = configs.current(DEV).tile("bwd", torch.bfloat16).block_v
    workspace_chunks(monkeypatch, lambda n: (min(8, n), 2 * bv))
    kernel_config(filter_dense_fraction=1.0)  # gathered: keep every class
    h, w, t, _, _ = make_inputs(gen, 123, 40, 2 * bv + 5, torch.bfloat16)
    h, w, t = to_dev(DEV, h, w, t)
    w64 = w.detach().double().requires_grad_()
    oracle(h.detach().double(), w64, t, reduction="none")[0].sum().backward()
    errs = []
    for budget in (None, 0.0):
        ww = w.detach().clone().requires_grad_()
        loss = cutce.linear_cross_entropy(h, ww, t, reduction="none", impl="triton",
                                          memory_budget=budget,
                                          filter_eps=1e-30 if gathered else None)
        loss.sum().backward()
        assert torch.isfinite(ww.grad).all()
        errs.append(rel_err(ww.grad, w64.grad))
    assert errs[0] < 0.8 * errs[1], f"float32 dC sum {errs[0]:.3g} vs 16-bit per chunk {errs[1]:.3g}"


def test_filter_tiny_eps_is_exact(gen, monkeypatch, kernel_config):
    """A tiny eps keeps every class, through the filtered (gathered-classes) path itself: same
    gradients as the dense exact backward."""
    from cutce.backends.triton import backward as tbwd
    kernel_config(filter_dense_fraction=1.0)  # gather even if all are kept
    seen = []
    real = tbwd._kept_classes
    monkeypatch.setattr(tbwd, "_kept_classes", lambda *a: seen.append(real(*a)) or seen[-1])
    h, w, t, b, _ = make_inputs(gen, 40, 32, 150, torch.float32, bias=True)
    h, w, t, b = to_dev(DEV, h, w, t, b)
    out = []
    for eps in (None, 1e-30):
        hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss = cutce.linear_cross_entropy(hh, ww, t, b, impl="triton", filter_eps=eps, memory_budget=0)
        out.append(torch.autograd.grad(loss, (hh, ww)))
    assert len(seen) == 1 and seen[0] is not None and seen[0].numel() == w.shape[0], \
        "the filtered run must take the gathered path and keep every class"
    for a, c in zip(*out):
        assert rel_err(a, c) < 1e-6


def test_fp32_matmul_precision_follows_torch():
    """float32 dots are IEEE unless the user made PyTorch's float32 matmuls TF32, whichever
    API set it (each case in a fresh process: mixing the APIs is itself an error in torch)."""
    import subprocess
    import sys
    code = ("import torch; from cutce.backends.triton import configs as c; p = c.dot_precision; "
            "r = [p(torch.float32), p(torch.bfloat16)]; {}; r.append(p(torch.float32)); print(r)")
    cases = {"torch.backends.cuda.matmul.fp32_precision = 'tf32'": "['ieee', 'tf32', 'tf32']",
             "torch.set_float32_matmul_precision('high')": "['ieee', 'tf32', 'tf32']"}
    for setter, want in cases.items():
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", code.format(setter)],
                             capture_output=True, text=True, timeout=300)
        assert out.stdout.strip() == want, (setter, out.stdout, out.stderr[-2000:])


def test_filter_drops_only_negligible_classes(gen, monkeypatch, kernel_config):
    """Filtering keeps every class with a non-negligible probability (exact dC rows) and drops
    the others whole (zero dC rows) -- the dropped rows' exact values are tiny."""
    kernel_config(filter_dense_fraction=1.0)  # gather even if most are kept
    h, w, t, _, _ = make_inputs(gen, 48, 32, 400, torch.float32, logit_std=6.0)
    # Peaked rows whose target is their top class (as in a trained model): the forward's bound
    # is then tight whatever the vocabulary split, so the test doesn't depend on the device.
    t = (h.detach() @ w.detach().T).argmax(1)
    h, w, t = to_dev(DEV, h, w, t)
    eps = 1e-3
    grads = []
    for f in (None, eps):
        ww = w.detach().clone().requires_grad_()
        # memory_budget=0: the exact run takes the same recompute kernels as the filtered one
        loss = cutce.linear_cross_entropy(h, ww, t, impl="triton", filter_eps=f, reduction="sum",
                                          memory_budget=0)
        grads.append(torch.autograd.grad(loss, ww)[0])
    exact, filt = grads
    dropped = (filt == 0).all(dim=1)
    assert 0 < int(dropped.sum()) < w.shape[0], "the test data should make filtering drop some classes"
    torch.testing.assert_close(filt[~dropped], exact[~dropped], rtol=1e-5, atol=1e-6)
    p_max = torch.softmax(h.double() @ w.double().T, -1).amax(0)
    assert (p_max[dropped.to(p_max.device)] < eps).all()
    assert not dropped[t].any(), "a row's target class is never dropped"


def test_filter_keeping_most_classes_runs_dense_and_exact(gen, monkeypatch):
    from cutce.backends.triton import backward as tbwd
    seen = []
    real = tbwd._kept_classes
    monkeypatch.setattr(tbwd, "_kept_classes", lambda *a: seen.append(real(*a)) or seen[-1])
    h, w, t, b, _ = make_inputs(gen, 40, 32, 150, torch.float32, bias=True, logit_std=0.5)
    h, w, t, b = to_dev(DEV, h, w, t, b)
    exact, filt = (_loss_and_grads(h, w, t, b, filter_eps=eps, memory_budget=0) for eps in (None, 1e-3))
    assert seen == [None]
    for a, c in zip(exact, filt):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_empty_and_ignored(gen):
    h, w, t, b, _ = make_inputs(gen, 0, 16, 50, torch.float32, bias=True)
    h, w, t, b = to_dev(DEV, h, w, t, b)
    loss = cutce.linear_cross_entropy(h, w, t, b, impl="triton")
    assert loss.item() == 0.0
    loss.backward()
    h, w, t, b, _ = make_inputs(gen, 20, 16, 50, torch.float32, bias=True)
    h, w, t, b = to_dev(DEV, h, w, t, b)
    loss = cutce.linear_cross_entropy(h, w, torch.full_like(t, -100), b, impl="triton")
    loss.backward()
    assert loss.item() == 0.0 and w.grad.abs().max().item() == 0.0


# ---- GPU only: real sizes, determinism, 64-bit offsets, torch.compile ----------------------
