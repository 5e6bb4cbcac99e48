"""linear_distillation_loss's options token_weights, student_logit_scale/teacher_logit_scale and
memory_budget against a float64 reference on materialized logits, written here from the
docstring's formula (reference.py's distill_reference has neither token weights nor logit
scales). The torch path runs in float64 with tight tolerances and many combinations; the Triton
path (the interpreter on CPU: few, small cases) in float32, within 1.5x the float32 torch path's
own error against float64."""

from __future__ import annotations

import itertools

import pytest
import torch

import cutce
from cutce.backends.pytorch import distill as torch_distill
from distill_cases import make, to_dev
from reference import distill_reference, rel_err
from triton_support import DEV, requires_triton

F64 = torch.float64
V, DS, DT = 131, 24, 40
IGNORE = -100

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: one thread is as fast


def reference(*args, **opts):
    """The docstring's expression in float64 on dense logits, differentiable w.r.t. every given
    tensor (token weights included; shifted as targets, the loss's rule)."""
    return distill_reference(*args, dtype=F64, **opts)


def weights(gen, lead, dtype, grad=False):
    """Fresh token weights in [0.25, 1.75) (never zero), a leaf."""
    return (torch.rand(lead, generator=gen) * 1.5 + 0.25).to(dtype).to(DEV).requires_grad_(grad)


def as_f64(tensors):
    """float64 copies, leaves with the same requires_grad (the reference's inputs)."""
    return tuple(None if x is None else x.detach().to(F64).requires_grad_(x.requires_grad)
                 if x.is_floating_point() else x for x in tensors)


def leaves_of(tensors):
    return [x for x in tensors if x is not None and x.is_floating_point() and x.requires_grad]


def call(tensors, w, impl, **opts):
    hs, ws, bs, ht, wt, bt, t = tensors
    return cutce.linear_distillation_loss(hs, ws, ht, wt, t, student_bias=bs, teacher_bias=bt,
                                          token_weights=w, impl=impl, **opts)


def ref_of(tensors, w, **opts):
    hs, ws, bs, ht, wt, bt, t = tensors
    opts = {k: x for k, x in opts.items() if k != "memory_budget"}
    return reference(hs, ws, ht, wt, t, bs=bs, bt=bt, token_weights=w, **opts)


def values(out, leaves, g):
    """(out, d(out . g)/d leaf for each leaf) as float64."""
    grads = torch.autograd.grad((out.double() * g).sum(), leaves)
    return [out.detach().double()] + [x.double() for x in grads]


def upstream(gen, shape):
    return torch.randn(shape, generator=gen, dtype=F64).to(DEV)


# ---- torch path, float64: many combinations --------------------------------------------------

VARIANTS = {
    # flat tokens, no softcaps, T = 1, frozen teacher, one chunk
    "plain": dict(lead=23, shift=False, teacher_grad=False, caps=None, temperature=1.0,
                  chunk_rows=None),
    # (3, 7) shifted, softcaps, T = 1.7, teacher with gradients, chunks of 5 rows
    "rich": dict(lead=(3, 7), shift=True, teacher_grad=True, caps=(5.0, 3.0), temperature=1.7,
                 chunk_rows=5),
}
SCALES = {"no-scale": (1.0, 1.0), "scales": (0.6, 1.8)}
TOKEN_WEIGHTS = ("no-w", "w", "w-grad")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("tw", TOKEN_WEIGHTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_torch_float64_matches_reference(gen, beta, ce_weight, reduction, tw, scales, variant,
                                         monkeypatch):
    """Loss and every gradient (student hidden/weight/bias, the teacher's when it requires grad,
    differentiable token weights) at the default budget and at memory_budget=0."""
    cfg = VARIANTS[variant]
    if cfg["chunk_rows"]:  # several chunks: per-chunk coefficients and summed weight gradients
        monkeypatch.setitem(torch_distill.CHUNK_BYTES, "cpu",
                            V * 8 * torch_distill._TEMPS * cfg["chunk_rows"])
    tensors = to_dev(DEV, make(gen, lead=cfg["lead"], ds=DS, dt=DT, v=V, dtype=F64, bias=True,
                               teacher_grad=cfg["teacher_grad"], ignore_frac=0.25))
    t = tensors[-1]
    t.view(-1)[[5, 9]] = IGNORE  # ignored rows at any seed (kept after the shift)
    t.view(-1)[-1] = 7  # and a valid one
    w = None if tw == "no-w" else weights(gen, t.shape, F64, grad=tw == "w-grad")
    s_scale, t_scale = SCALES[scales]
    caps = cfg["caps"] or (None, None)
    opts = dict(beta=beta, ce_weight=ce_weight, reduction=reduction, shift=cfg["shift"],
                temperature=cfg["temperature"], student_softcap=caps[0], teacher_softcap=caps[1],
                student_logit_scale=s_scale, teacher_logit_scale=t_scale)
    leaves = leaves_of(tensors) + ([w] if w is not None and w.requires_grad else [])
    ref = ref_of(tensors, w, **opts)
    g = upstream(gen, ref.shape)
    want = values(ref, leaves, g)
    assert torch.isfinite(want[0]).all() and want[0].abs().max() > 0
    for budget in (None, 0):
        out = call(tensors, w, "torch", memory_budget=budget, **opts)
        assert out.dtype == F64 and out.shape == ref.shape
        got = values(out, leaves, g)
        for i, (a, r) in enumerate(zip(got, want)):
            assert a.shape == r.shape
            assert rel_err(a, r) < 1e-10, (budget, i, rel_err(a, r))


def test_torch_no_targets_token_weights(gen):
    """Without targets every token counts: "mean" divides by the sum of all the weights."""
    hs, ws, bs, ht, wt, bt, _ = make(gen, lead=(3, 7), ds=DS, dt=DT, v=V, dtype=F64, bias=True,
                                     targets=False)
    tensors = (hs, ws, bs, ht, wt, bt, None)
    w = weights(gen, (3, 7), F64, grad=True)
    for reduction in ("mean", "sum", "none"):
        opts = dict(beta=0.4, reduction=reduction, shift=True, teacher_logit_scale=1.8,
                    student_logit_scale=0.6)
        ref = ref_of(tensors, w, **opts)
        g = upstream(gen, ref.shape)
        leaves = leaves_of(tensors) + [w]
        want = values(ref, leaves, g)
        for budget in (None, 0):
            got = values(call(tensors, w, "torch", memory_budget=budget, **opts), leaves, g)
            for a, r in zip(got, want):
                assert rel_err(a, r) < 1e-10


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_zero_token_weights_without_gradient(gen, reduction):
    """Some valid rows weighted 0 (weights without gradient): loss and the heads' gradients."""
    tensors = make(gen, lead=23, ds=DS, dt=DT, v=V, dtype=F64, bias=True, teacher_grad=True)
    t = tensors[-1]
    w = weights(gen, t.shape, F64)
    w[::3] = 0.0
    assert bool(((w == 0) & (t != IGNORE)).any())
    opts = dict(beta=0.4, ce_weight=0.3, reduction=reduction, student_logit_scale=1.8)
    ref = ref_of(tensors, w, **opts)
    g = upstream(gen, ref.shape)
    want = values(ref, leaves_of(tensors), g)
    for budget in (None, 0):
        got = values(call(tensors, w, "torch", memory_budget=budget, **opts), leaves_of(tensors), g)
        for a, r in zip(got, want):
            assert rel_err(a, r) < 1e-10


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_of_zero_token_weights(gen, reduction, impl):
    """A valid row whose token weight is 0 still sends its loss to that weight's gradient."""
    dtype = F64 if impl == "torch" else torch.float32
    tensors = to_dev(DEV, make(gen, lead=13, ds=DS, dt=DT, v=V, dtype=dtype, ignore_frac=0.0))
    w = weights(gen, 13, dtype)
    w[::4] = 0.0
    w.requires_grad_(True)
    opts = dict(beta=0.4, reduction=reduction)
    (got,) = torch.autograd.grad(call(tensors, w, impl, **opts), (w,))
    w64 = w.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(ref_of(as_f64(tensors), w64, **opts), (w64,))
    assert rel_err(got, want) < (1e-10 if impl == "torch" else 1e-5)


def test_torch_zero_token_weights_none_gradient(gen):
    """reduction="none": the gradient w.r.t. a zero token weight is the row's loss (right)."""
    tensors = make(gen, lead=13, ds=DS, dt=DT, v=V, dtype=F64, ignore_frac=0.0)
    w = weights(gen, 13, F64)
    w[::4] = 0.0
    w.requires_grad_(True)
    out = call(tensors, w, "torch", beta=0.4, reduction="none")
    g = upstream(gen, out.shape)
    (got,) = torch.autograd.grad((out * g).sum(), (w,))
    (want,) = torch.autograd.grad((ref_of(tensors, w, beta=0.4, reduction="none") * g).sum(), (w,))
    assert rel_err(got, want) < 1e-10


# ---- Triton path (the interpreter on CPU), float32 --------------------------------------------

# name: (beta, lead, shift, teacher_grad, token weights, loss options). Each is checked against
# float64 within 1.5x the float32 torch path's own error (plus a small floor).
TRITON_CASES = {
    # frozen teacher, beta < 1, "mean": the fused kernels at the default budget
    "fkl-mean-fused": (0.0, 23, False, False, "w",
                       dict(ce_weight=0.3, reduction="mean", student_softcap=5.0,
                            teacher_softcap=3.0, temperature=1.7, student_logit_scale=0.6,
                            teacher_logit_scale=1.8)),
    # differentiable weights and a teacher with gradients: the recompute kernels
    "jsd-sum-shift": (0.4, (3, 7), True, True, "w-grad",
                      dict(ce_weight=0.0, reduction="sum", student_logit_scale=1.8,
                           teacher_logit_scale=0.6)),
    "rkl-none": (1.0, 23, False, False, "w-grad",
                 dict(ce_weight=0.3, reduction="none", temperature=1.7, student_softcap=5.0,
                      student_logit_scale=1.8, teacher_logit_scale=0.6)),
    "rkl-mean-teacher": (1.0, (3, 7), True, True, "no-w",
                         dict(ce_weight=0.0, reduction="mean", teacher_softcap=3.0,
                              student_logit_scale=0.6, teacher_logit_scale=1.8)),
    # fused kernels again: shifted rows, per-row coefficients from the weights, both softcaps
    "jsd-mean-shift-fused": (0.4, (3, 7), True, False, "w",
                             dict(ce_weight=0.3, reduction="mean", temperature=1.7,
                                  student_softcap=5.0, teacher_softcap=3.0,
                                  student_logit_scale=1.8, teacher_logit_scale=0.6)),
    "fkl-none-teacher": (0.0, 23, False, True, "no-w", dict(ce_weight=0.0, reduction="none")),
}


def check_triton(gen, tensors, w, g=None, **opts):
    """Triton (float32) against float64 within 1.5x the float32 torch path's error plus a floor:
    the loss and the gradients of every leaf (token weights included when they require grad),
    for the upstream gradient ``g`` (random if None). The floor is 2e-6, and 1e-5 for the JSD,
    whose Triton gradients measure 2-5x the torch path's error (a few 1e-6) with or without
    the options tested here."""
    floor = 1e-5 if 0.0 < opts["beta"] < 1.0 else 2e-6
    leaves = leaves_of(tensors) + ([w] if w is not None and w.requires_grad else [])
    t64 = as_f64(tensors)
    w64 = None if w is None else w.detach().double().requires_grad_(w.requires_grad)
    ref = ref_of(t64, w64, **opts)
    g = upstream(gen, ref.shape) if g is None else g
    want = values(ref, leaves_of(t64) + ([w64] if w64 is not None and w64.requires_grad else []),
                  g)
    assert torch.isfinite(want[0]).all() and want[0].abs().max() > 0
    base = values(call(tensors, w, "torch", **opts), leaves, g)
    out = call(tensors, w, "triton", **opts)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    got = values(out, leaves, g)
    for i, (a, b, r) in enumerate(zip(got, base, want)):
        torch_err = rel_err(b, r)
        assert torch_err < 1e-4, (i, torch_err)
        assert rel_err(a, r) <= 1.5 * torch_err + floor, (i, rel_err(a, r), torch_err)
    return got


@requires_triton
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_matches_reference(gen, case):
    beta, lead, shift, teacher_grad, tw, opts = TRITON_CASES[case]
    tensors = to_dev(DEV, make(gen, lead=lead, ds=DS, dt=DT, v=V, bias=True,
                               teacher_grad=teacher_grad, ignore_frac=0.25))
    w = None if tw == "no-w" else weights(gen, tensors[-1].shape, torch.float32,
                                          grad=tw == "w-grad")
    check_triton(gen, tensors, w, beta=beta, shift=shift, **opts)


@requires_triton
def test_triton_budget_zero_and_default_agree(gen):
    """Frozen teacher, beta < 1, "mean": the default budget (fused kernels) and 0 (recompute
    kernels) both match float64 and each other; budget 0 may be backpropagated twice, the
    default raises on a second backward."""
    tensors = to_dev(DEV, make(gen, lead=23, ds=DS, dt=DT, v=V, bias=True, ignore_frac=0.25))
    w = weights(gen, 23, torch.float32)
    opts = dict(beta=0.4, ce_weight=0.3, temperature=1.7, student_logit_scale=1.8,
                teacher_logit_scale=0.6, teacher_softcap=3.0)
    g = upstream(gen, ())
    fused = check_triton(gen, tensors, w, g, **opts)
    recompute = check_triton(gen, tensors, w, g, memory_budget=0, **opts)
    for a, b in zip(fused, recompute):
        assert rel_err(a, b) < 1e-5
    leaves = leaves_of(tensors)
    loss = call(tensors, w, "triton", memory_budget=0, **opts)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    loss = call(tensors, w, "triton", **opts)
    torch.autograd.grad(loss, leaves, retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        torch.autograd.grad(loss, leaves)


# ---- edge cases (both paths) ------------------------------------------------------------------

IMPLS = ["torch", pytest.param("triton", marks=requires_triton)]


@pytest.mark.parametrize("impl", IMPLS)
def test_mean_with_zero_weights_on_valid_rows_is_nan(gen, impl):
    """Valid rows whose weights sum to 0: "mean" is NaN (0/0) at either budget; "sum" is 0."""
    dtype = F64 if impl == "torch" else torch.float32
    tensors = to_dev(DEV, make(gen, lead=11, ds=DS, dt=DT, v=V, dtype=dtype, bias=True))
    t = tensors[-1]
    assert bool((t != IGNORE).any())
    w = torch.where(t != IGNORE, 0.0, 1.0).to(dtype)  # nonzero only on ignored rows
    for budget in (None, 0):
        out = call(tensors, w, impl, beta=0.4, ce_weight=0.3, memory_budget=budget)
        assert out.shape == () and torch.isnan(out), (budget, out)
        out = call(tensors, w, impl, beta=0.4, ce_weight=0.3, reduction="sum",
                   memory_budget=budget)
        assert out.item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_ignored_gives_zero_and_zero_gradients(gen, impl):
    dtype = F64 if impl == "torch" else torch.float32
    hs, ws, bs, ht, wt, bt, t = to_dev(DEV, make(gen, lead=(2, 6), ds=DS, dt=DT, v=V, dtype=dtype,
                                                 bias=True, teacher_grad=True))
    tensors = (hs, ws, bs, ht, wt, bt, torch.full_like(t, IGNORE))
    for tw, reduction, budget in itertools.product(("no-w", "w-grad"), ("mean", "sum"), (None, 0)):
        w = None if tw == "no-w" else weights(gen, t.shape, dtype, grad=True)
        leaves = leaves_of(tensors) + ([w] if w is not None else [])
        out = call(tensors, w, impl, beta=0.4, ce_weight=0.3, reduction=reduction, shift=True,
                   student_logit_scale=0.6, memory_budget=budget)
        assert out.item() == 0.0, (tw, reduction, budget)
        grads = torch.autograd.grad(out, leaves, allow_unused=True)
        assert all(g is None or (g == 0).all() for g in grads), (tw, reduction, budget)
        assert all(g is not None for g in grads[:3])  # the student's head gets its zeros


def test_torch_budget_zero_twice_default_once(gen):
    """Torch path: memory_budget=0 (per-token recompute) may be backpropagated twice; the default
    (gradients formed in the forward) raises on a second backward, teacher frozen or not."""
    for teacher_grad in (False, True):
        tensors = make(gen, lead=23, ds=DS, dt=DT, v=V, dtype=F64, bias=True,
                       teacher_grad=teacher_grad)
        w = weights(gen, 23, F64)
        opts = dict(beta=0.4, ce_weight=0.3, student_logit_scale=0.6, teacher_logit_scale=1.8)
        leaves = leaves_of(tensors)
        zero = call(tensors, w, "torch", memory_budget=0, **opts)
        first = torch.autograd.grad(zero, leaves, retain_graph=True)
        second = torch.autograd.grad(zero, leaves)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        default = call(tensors, w, "torch", **opts)
        assert rel_err(default, zero) < 1e-13
        again = torch.autograd.grad(default, leaves, retain_graph=True)
        assert all(rel_err(a, b) < 1e-12 for a, b in zip(again, first))
        with pytest.raises(RuntimeError, match="already backpropagated"):
            torch.autograd.grad(default, leaves)


@pytest.mark.parametrize("name", ["student_logit_scale", "teacher_logit_scale"])
@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_logit_scale_raises(gen, name, bad):
    hs, ws, _, ht, wt, _, t = make(gen, lead=5, ds=DS, dt=DT, v=V)
    with pytest.raises(ValueError, match=name):
        cutce.linear_distillation_loss(hs, ws, ht, wt, t, impl="torch", **{name: bad})


def test_bad_token_weights_raise(gen):
    hs, ws, _, ht, wt, _, t = make(gen, lead=(2, 5), ds=DS, dt=DT, v=V)
    for bad in (torch.ones(9), torch.ones(2, 4), torch.ones(2, 5, 1), torch.ones(10),
                torch.ones(2, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match="token_weights"):
            cutce.linear_distillation_loss(hs, ws, ht, wt, t, token_weights=bad, impl="torch")
    # with shift, the weights keep the targets' unshifted shape (shifted as the targets)
    with pytest.raises(ValueError, match="token_weights"):
        cutce.linear_distillation_loss(hs, ws, ht, wt, t, token_weights=torch.ones(2, 4),
                                       shift=True, impl="torch")
