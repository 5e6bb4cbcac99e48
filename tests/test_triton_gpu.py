"""The Triton path on the GPU: real sizes, dtypes, TF32, determinism, 64-bit offsets,
torch.compile, the deferred targets check (marked ``gpu``; skipped without CUDA). The small
ragged-shape tests, which also run in Triton's interpreter on CPU, are in test_triton.py."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import cutce  # noqa: E402
from cutce.bench import data as bench_data  # noqa: E402
from cutce.backends.triton import configs  # noqa: E402

from reference import make_inputs, oracle, rel_err  # noqa: E402
from triton_cases import compare, to_dev  # noqa: E402
from triton_support import DEV, gpu  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned")  # conftest.py: NaN-filled launcher buffers


def _zipf(n, d, v, dtype, seed=0):
    return bench_data.make_inputs(bench_data.Shape("test", n, d, v), "zipf", dtype, "cuda", seed)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 2304, 256000), (8192, 4096, 128256), (4096, 5120, 151936),
                                   (3001, 8192, 131071)])
def test_gpu_real_shapes_bf16(shape):
    n, d, v = shape
    h, w, t = _zipf(n, d, v, torch.bfloat16)

    def grads(fn, a, c):
        a, c = a.detach().requires_grad_(), c.detach().requires_grad_()
        return torch.autograd.grad(fn(a, c), (a, c))

    ref = grads(lambda a, c: cutce.linear_cross_entropy(a.float(), c.float(), t, impl="torch"), h, w)
    got = grads(lambda a, c: cutce.linear_cross_entropy(a, c, t, impl="triton"), h, w)
    eager = grads(lambda a, c: torch.nn.functional.cross_entropy((a @ c.T).float(), t), h, w)
    for name, x, e, r in zip(("dE", "dC"), got, eager, ref):
        assert rel_err(x, r) <= 1.5 * rel_err(e, r), name


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_dtypes_options(dtype, gen):
    h, w, t, b, tw = make_inputs(gen, (4, 509), 2304, 32003, dtype, bias=True, token_weights=True,
                                 ignore_frac=0.1, logit_std=4.0)
    h, w, t, b, tw = to_dev("cuda", h, w, t, b, tw)
    # float32 is IEEE by default (TF32 only if the user enables it for torch): a float32 floor
    # of 2e-5 tells the two apart (TF32's error here is ~1e-3).
    compare(h, w, t, b, tw, dict(shift=True, softcap=30.0, label_smoothing=0.1, z_loss=1e-4),
             with_lse=True, floor={torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype])


@gpu
@pytest.mark.gpu
def test_gpu_fp32_tf32_is_the_users_choice(gen, monkeypatch):
    """With torch's float32 matmuls set to TF32 the kernels use TF32 too (larger error), and
    IEEE otherwise: the choice is PyTorch's documented flag, never ours."""
    h, w, t, _, _ = make_inputs(gen, 1024, 2304, 8192, torch.float32, logit_std=4.0)
    h, w, t = to_dev("cuda", h, w, t)
    ref = oracle(h.detach().double().cpu(), w.detach().double().cpu(), t.cpu())[0]
    errs = {}
    for tf32 in (False, True):
        monkeypatch.setattr(configs, "fp32_matmul_uses_tf32", lambda tf32=tf32: tf32)
        errs[tf32] = rel_err(cutce.linear_cross_entropy(h, w, t, impl="triton").cpu(), ref)
    assert errs[False] < 1e-6 < errs[True], errs


@gpu
@pytest.mark.gpu
def test_gpu_deterministic():
    h, w, t = _zipf(4096, 2304, 65536, torch.bfloat16, seed=5)
    runs = []
    for _ in range(2):
        a, c = h.detach().requires_grad_(), w.detach().requires_grad_()
        loss = cutce.linear_cross_entropy(a, c, t, impl="triton")
        runs.append((loss, *torch.autograd.grad(loss, (a, c))))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@gpu
@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N*V > 2**31 logits (never materialized) and N*D, V*D offsets computed in 64 bits."""
    n, d, v = 16384, 128, 140000
    h, w, t = _zipf(n, d, v, torch.bfloat16, seed=7)
    t[-5:] = torch.arange(v - 5, v, device="cuda")  # targets in the last vocabulary tile
    a, c = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = cutce.linear_cross_entropy(a, c, t, impl="triton", reduction="none")
    ref = cutce.linear_cross_entropy(h.float(), w.float(), t, impl="torch", reduction="none")
    assert rel_err(loss, ref) < 1e-3
    loss.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(c.grad).all()


@gpu
@pytest.mark.gpu
def test_gpu_int64_weight_offsets():
    """V*D > 2**31 (D=8192, V=270000): rows of dC and of the weight past element 2**31 are
    addressed in 64 bits. Rows past the boundary, targeted by many tokens, equal the torch path."""
    n, d, v = 512, 8192, 270000
    first = 2**31 // d + 1  # first weight row entirely past element 2**31
    g = torch.Generator(device="cuda").manual_seed(11)
    w = (torch.randn(v, d, device="cuda", generator=g) * d**-0.5).to(torch.bfloat16)
    h = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)
    t = torch.randint(first, v, (n,), device="cuda", generator=g)
    t[: n // 2] = torch.randint(0, 64, (n // 2,), device="cuda", generator=g)
    out = {}
    for impl, budget in (("torch", 0.0), ("triton", 0.0), ("triton", 2.0)):  # recompute, fused
        a, c = h.detach().requires_grad_(), w.detach().requires_grad_()
        loss = cutce.linear_cross_entropy(a, c, t, impl=impl, memory_budget=budget)
        out[impl, budget] = (loss, *torch.autograd.grad(loss, (a, c)))
        del a, c
    lr, dhr, dwr = out["torch", 0.0]
    rows = torch.unique(t[t >= first])
    for budget in (0.0, 2.0):
        lt, dht, dwt = out["triton", budget]
        assert rel_err(lt, lr) < 1e-5 and rel_err(dht, dhr) < 2e-2, budget
        assert rel_err(dwt[rows], dwr[rows]) < 2e-2 and rel_err(dwt[first:], dwr[first:]) < 2e-2
        assert torch.isfinite(dwt).all()


@gpu
@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    h, w, t = _zipf(2048, 2304, 50000, torch.bfloat16, seed=9)

    def f(a, c):
        return cutce.linear_cross_entropy(a, c, t, impl="triton", softcap=30.0, shift=False)

    cf = torch.compile(f, fullgraph=True)
    outs = []
    for fn in (f, cf):
        a, c = h.detach().requires_grad_(), w.detach().requires_grad_()
        loss = fn(a, c)
        outs.append((loss, *torch.autograd.grad(loss, (a, c))))
    # The loss's O(N) arithmetic around the kernels is fused by inductor (one float32 rounding
    # apart, seen 6.7e-8 on the H200); the kernels' outputs, the gradients, must be equal.
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=0)
    for name, x, y in zip(("dE", "dC"), outs[0][1:], outs[1][1:]):
        assert torch.equal(x, y), f"{name}: compiled differs from eager by {rel_err(y, x):.3g}"


@gpu
@pytest.mark.parametrize("budget", [0.0, None], ids=["recompute", "default"])
def test_gpu_bad_targets_raise_after_queueing(gen, budget):
    """The targets' range check runs after the kernels are queued (no idle GPU during the
    call's Python): it still raises the clear error, for every strategy, and CUDA keeps working."""
    h, w, t, _, _ = make_inputs(gen, 300, 64, 1000, torch.bfloat16)
    h, w, t = to_dev(DEV, h, w, t)
    h.requires_grad_()
    w.requires_grad_()
    for bad in (1000, -5):
        tb = t.clone()
        tb[7] = bad
        for kw in (dict(), dict(reduction="none")):
            with pytest.raises(ValueError, match=rf"targets: expected class indices in \[0, 1000\)"
                                                 rf" or ignore_index=-100, got {bad}"):
                cutce.linear_cross_entropy(h, w, tb, impl="triton", memory_budget=budget, **kw)
        with pytest.raises(ValueError, match="got -5|got 1000"):
            cutce.linear_log_probs(h, w, tb, impl="triton")
    cutce.linear_cross_entropy(h, w, t, impl="triton", memory_budget=budget).backward()
    torch.cuda.synchronize()
    assert torch.isfinite(w.grad).all()


@gpu
@pytest.mark.gpu
def test_gpu_log_fast_subnormals_and_accuracy():
    """common.log_fast's GPU form (the special-function unit's log2, which flushes subnormal
    inputs to -inf) against float64 logs from 2**-149 to 1: finite everywhere, ~1e-6 relative."""
    import triton.language as tl

    from cutce.backends.triton.common import log_fast

    @triton.jit
    def k(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + o, mask=o < n, other=1.0)
        tl.store(y_ptr + o, log_fast(x, True), mask=o < n)

    e = torch.linspace(-149, 0, 100_003, dtype=torch.float64)
    x = torch.exp2(e + torch.rand(e.shape, dtype=torch.float64) * 0.999).float().cuda()
    x = x[x > 0]
    y = torch.empty_like(x)
    k[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = x.double().log()
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).abs() / ref.abs().clamp_min(1.0)).max() < 1e-5
