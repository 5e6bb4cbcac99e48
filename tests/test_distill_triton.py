"""linear_distillation_loss's Triton path: the interpreter on CPU (few, small cases), CUDA on
the device (``gpu``-marked tests at a Qwen-like pair). Helpers and the oracle check are
distill_cases.py's."""

from __future__ import annotations

import pytest
import torch

import cutce
from cutce import distill
from distill_cases import TOL, check, make, to_dev
from reference import distill_reference, rel_err
from triton_support import DEV, gpu


# ---- Triton kernels (the interpreter on CPU: few, small cases; CUDA on the device) -----------

TRITON_CASES = {
    "fwd-kl": (0.0, torch.float32, dict(ce_weight=0.3, student_softcap=5.0, teacher_softcap=3.0)),
    "rev-kl": (1.0, torch.float16, dict(reduction="none", temperature=2.0)),
    "jsd": (0.5, torch.float32, dict(reduction="sum", temperature=0.8)),
    "jsd-other": (0.3, torch.float16, dict(ce_weight=0.5, teacher_softcap=4.0)),
}


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_matches_oracle(gen, case, monkeypatch):
    pytest.importorskip("triton")
    beta, dtype, opts = TRITON_CASES[case]
    if dtype == torch.float16:
        if torch.cuda.is_available():
            pytest.skip("float16 is refused on CUDA (its range underflows the logit gradients)")
        monkeypatch.setattr(distill, "F16_TRITON", True)  # the interpreter's 16-bit type
    # even D for 16-bit heads: dE's float32 sums then live half in dE's own bytes
    ds, dt = (30, 46) if dtype == torch.float16 else (29, 45)
    tensors = to_dev(DEV, make(gen, ds=ds, dt=dt, dtype=dtype, bias=case != "rev-kl",
                            teacher_grad=case != "jsd"))
    check(gen, tensors, dtype, impl="triton", beta=beta, **opts)


@pytest.mark.parametrize("beta,ds,dt", [(1.0, 32, 48), (0.3, 29, 48), (0.0, 24, 40)])
def test_triton_recompute_bulk_loads(gen, beta, ds, dt, monkeypatch, kernel_config):
    """The recompute kernels with KernelConfig.distill_recompute_tma (the default): tensor-descriptor
    loads where the heads' rows are 16-byte aligned (the interpreter's float32: D % 4 == 0),
    pointers where one is not (29); a teacher with gradients (its dz too) and several vocabulary
    chunks in the backward (bulk loads past a chunk's end read real classes, masked)."""
    pytest.importorskip("triton")
    from cutce.backends.triton import configs
    kernel_config(distill_recompute_tma=True)
    seen = []
    real = configs.use_tma
    monkeypatch.setattr(configs, "use_tma", lambda *t: seen.append(real(*t)) or seen[-1])
    tensors = to_dev(DEV, make(gen, lead=37, ds=ds, dt=dt, v=290, bias=True, teacher_grad=True))
    check(gen, tensors, torch.float32, impl="triton", beta=beta, temperature=1.3, memory_budget=0)
    assert seen and all(seen) == (ds % 4 == 0 and dt % 4 == 0)


def test_triton_recompute_pointer_loads(gen, monkeypatch, kernel_config):
    """KernelConfig.distill_recompute_tma off: pointer loads
    even where bulk loads would apply (aligned rows), the same results."""
    pytest.importorskip("triton")
    from cutce.backends.triton import configs
    kernel_config(distill_recompute_tma=False)
    monkeypatch.setattr(configs, "use_tma", lambda *t: pytest.fail("bulk loads asked for"))
    tensors = to_dev(DEV, make(gen, lead=37, ds=32, dt=48, v=290, bias=True, teacher_grad=True))
    check(gen, tensors, torch.float32, impl="triton", beta=0.3, temperature=1.3, memory_budget=0)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_triton_vocabulary_splits(gen, beta):
    """One token block: the forward splits the vocabulary (as on the GPU) and combines the
    splits' statistics."""
    pytest.importorskip("triton")
    tensors = to_dev(DEV, make(gen, lead=13, bias=True))
    check(gen, tensors, torch.float32, impl="triton", beta=beta, ce_weight=0.4, temperature=1.7,
          memory_budget=0)  # the recompute kernels (test_distill_fused.py: the fused ones)


def test_triton_shift_frozen_teacher_and_empty(gen):
    pytest.importorskip("triton")
    hs, ws, bs, ht, wt, bt, t = to_dev(DEV, make(gen, lead=(2, 11), bias=True))
    check(gen, (hs, ws, bs, ht, wt, bt, t), torch.float32, impl="triton", beta=0.5, shift=True)
    assert ht.grad is None and wt.grad is None
    loss = cutce.linear_distillation_loss(hs, ws, ht, wt, torch.full_like(t, -100), impl="triton")
    grads = torch.autograd.grad(loss, (hs, ws))
    assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
    e = cutce.linear_distillation_loss(hs[:0], ws, ht[:0], wt, t[:0], impl="triton")
    (g,) = torch.autograd.grad(e, (ws,))
    assert e.item() == 0.0 and (g == 0).all()


def test_triton_says_why_it_cannot_run(gen):
    hs, ws, _, ht, wt, _, t = make(gen)
    with pytest.raises(RuntimeError, match="float64"):
        cutce.linear_distillation_loss(hs.double(), ws.double(), ht.double(), wt.double(), t,
                                       impl="triton")
    with pytest.raises(RuntimeError, match="both heads in one dtype"):
        cutce.linear_distillation_loss(hs, ws, ht.half(), wt.half(), t, impl="triton")
    # auto never fails over an uncovered case: the torch path runs it
    out = cutce.linear_distillation_loss(hs, ws, ht.half(), wt.half(), t, impl="auto")
    assert torch.isfinite(out)



def test_custom_ops_opcheck_and_compile(gen):
    """The three ops' schemas, fake impls and autograd registrations; a compiled call (aot_eager)
    of the Triton path equals the eager one."""
    pytest.importorskip("triton")
    from cutce.backends.triton import distill_ops  # noqa: F401  (registers the ops)
    hs, ws, bs, ht, wt, _, t = to_dev(DEV, make(gen, lead=21, v=67, bias=True, ignore_frac=0.0))
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    scal = (0.3, 1.5, 0.0, 3.0, 0.2)
    c = torch.full((21,), 1 / 21, device=DEV)
    torch.library.opcheck(torch.ops.cutce.distill_rows_triton, (hs, ws, bs, ht, wt, None, t, *scal),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.cutce.torch_distill,
                          (hs, ws, bs, ht, wt, None, t, c, *scal, 0, True, True, True, False, False,
                           False), test_utils=utils)
    torch.library.opcheck(torch.ops.cutce.torch_distill_rows, (hs, ws, bs, ht, wt, None, t, c, *scal),
                          test_utils=utils)
    fn = torch.compile(cutce.linear_distillation_loss, backend="aot_eager", fullgraph=True)
    for red in ("mean", "none"):
        kw = dict(student_bias=bs, beta=0.5, reduction=red, impl="triton")
        a, b = fn(hs, ws, ht, wt, t, **kw), cutce.linear_distillation_loss(hs, ws, ht, wt, t, **kw)
        ga = torch.autograd.grad(a.sum(), (hs, ws, bs))
        gb = torch.autograd.grad(b.sum(), (hs, ws, bs))
        assert torch.allclose(a, b) and all(torch.allclose(x, y) for x, y in zip(ga, gb))

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_gpu_qwen_pair_bf16_error_vs_eager(beta):
    """A Qwen2.5 7B -> 0.5B-like pair: Triton and torch paths as accurate as eager bf16."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, ds, dt, v = 4096, 896, 3584, 151936
    hs = torch.randn(n, ds, device="cuda", generator=g).bfloat16()
    ht = torch.randn(n, dt, device="cuda", generator=g).bfloat16()
    ws = (torch.randn(v, ds, device="cuda", generator=g) * (3.0 / ds**0.5)).bfloat16()
    wt = (torch.randn(v, dt, device="cuda", generator=g) * (4.0 / dt**0.5)).bfloat16()

    def grads(fn, cast):
        a, c = cast(hs).requires_grad_(), cast(ws).requires_grad_()
        loss = fn(a, c)
        return (loss.detach(), *torch.autograd.grad(loss, (a, c)))

    ref = grads(lambda a, c: cutce.linear_distillation_loss(a, c, ht.float(), wt.float(), beta=beta,
                                                            impl="torch"), lambda x: x.float())

    def eager(a, c):
        return distill_reference(a, c, ht, wt, beta=beta, dtype=torch.float32,
                                 logit_dtype=torch.bfloat16)

    want = grads(eager, lambda x: x.detach().clone())
    del eager
    for impl, budget in (("triton", None), ("triton", 0), ("torch", None)):  # fused, recompute
        got = grads(lambda a, c: cutce.linear_distillation_loss(a, c, ht, wt, beta=beta, impl=impl,
                                                                memory_budget=budget),
                    lambda x: x.detach().clone())
        for name, x, e, r in zip(("loss", "dE", "dC"), got, want, ref):
            assert rel_err(x, r) <= max(1.5 * rel_err(e, r), 1e-5), (impl, budget, name)
    # Triton path's memory: recompute (budget 0): the student's gradients plus half a float32
    # dE (N x Ds x 2 bytes) and a workspace, within 10% (the recompute workspace: chunks.RECOMPUTE_WORKSPACE, 8%);
    # fused (the default budget): within it
    del got, want, ref
    from cutce.engine.planner import DEFAULT_MEMORY_BUDGET
    inputs = (n + v) * (ds + ht.shape[-1]) * 2
    for budget, most in ((0, 0.10), (None, DEFAULT_MEMORY_BUDGET["triton"] * inputs / ((n + v) * ds * 2))):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = grads(lambda a, c: cutce.linear_distillation_loss(a, c, ht, wt, beta=beta,
                                                                impl="triton",
                                                                memory_budget=budget),
                    lambda x: x.detach().clone())
        torch.cuda.synchronize()
        student_grads = (n + v) * ds * 2
        extra = torch.cuda.max_memory_allocated() - base - 2 * student_grads  # clones + grads
        assert extra <= most * student_grads, f"{budget}: {extra / 2**20:.0f} MiB beyond the grads"
        del out


def test_triton_refuses_float16(gen):
    """float16's range flushes a distillation's small logit gradients on the GPU: Triton refuses
    it with the reason; 'auto' takes the exact torch path."""
    pytest.importorskip("triton")
    hs, ws, bs, ht, wt, bt, t = to_dev(DEV, make(gen, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="not float16"):
        cutce.linear_distillation_loss(hs, ws, ht, wt, t, impl="triton")
    check(gen, (hs, ws, bs, ht, wt, bt, t), torch.float16, impl="auto")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_dtypes_options(gen, dtype, monkeypatch):
    tensors = to_dev("cuda", make(gen, lead=(2, 509), ds=256, dt=512, v=32003, dtype=dtype, bias=True,
                               teacher_grad=True, ignore_frac=0.1))
    # the GPU rounds dz to 16 bits (the interpreter keeps it in float32)
    monkeypatch.setitem(TOL, dtype, {torch.float32: 1e-4, torch.float16: 5e-3,
                                     torch.bfloat16: 3e-2}[dtype])
    for beta in (0.0, 0.3, 1.0):
        check(gen, tensors, dtype, impl="triton", beta=beta, shift=True, ce_weight=0.2,
              student_softcap=30.0, teacher_softcap=20.0, temperature=1.5)


def test_hidden_grad_split_result_in_row_steps(gen):
    """dE's float32 sums, half in dE's own bytes, come out right whatever the row step (the
    in-place conversion reads each step's rows before writing them)."""
    pytest.importorskip("triton")
    from cutce.backends.triton.backward import HiddenGrad
    h = torch.randn(11, 6, generator=gen).half()
    acc = HiddenGrad(h)
    assert acc.split
    z, w = torch.randn(11, 5, generator=gen).half(), torch.randn(5, 6, generator=gen).half()
    acc.add(z, w)
    acc.add(z, w)
    want = (2 * z.float() @ w.float()).half()
    torch.testing.assert_close(acc.result(3), want, rtol=2e-3, atol=2e-3)


def test_hidden_grad_conversion_in_row_steps(gen):
    """dE's float32 sums, half of them in dE's own bytes, come out as the 16-bit gradient in
    row steps that read each step's bytes before writing them (10 rows in steps of 3)."""
    from cutce.backends.triton.backward import HiddenGrad
    h = torch.randn(10, 6, generator=gen).bfloat16()
    acc, ref = HiddenGrad(h), torch.zeros(10, 6)
    for _ in range(3):
        z = torch.randn(10, 5, generator=gen).bfloat16()
        w = torch.randn(5, 6, generator=gen).bfloat16()
        acc.add(z, w)
        ref += z.float() @ w.float()
    assert torch.equal(acc.result(3), ref.bfloat16())
