"""linear_sparse_distillation_loss against a float64 reference from materialized logits
(tests/sparse_cases.py: the docstring's expression, log_softmax over the whole vocabulary gathered
at the teacher's ids), on fresh ragged inputs: teacher ids from a real top-K, padded to a ragged
length with ignore_index at random columns (NaN log-probs there), one token with no id at all.

The torch path runs in float64 with tight tolerances over seeded random option combinations; the
Triton path (the interpreter on CPU: a few small cases) in float32, within 1.5x the float32 torch
path's own error against float64.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest
import torch

import cutce
from cutce.backends.pytorch import gather
from markdown_blocks import ROOT, example_env
from reference import rel_err
from sparse_cases import (D, F64, IGNORE, V, as_f64, make, reference, run, run_reference, values,
                          weights)
from triton_support import DEV, gpu, requires_triton

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: one thread is as fast


# ---- torch path, float64: seeded random option combinations --------------------------------

def draw(seed):
    """One combination of options (seeded; the first few are fixed corners)."""
    r = random.Random(seed)
    opts = dict(
        tail=("drop", "renormalize", "bucket")[seed % 3],
        reduction=("mean", "sum", "none")[(seed // 3) % 3],
        temperature=r.choice([1.0, 1.0, 0.7, 1.9]),
        ce_weight=r.choice([0.0, 0.0, 0.3, 1.0]),
        softcap=r.choice([None, None, 4.0]),
        logit_scale=r.choice([1.0, 1.0, 0.6]),
        shift=r.random() < 0.4,
        memory_budget=r.choice([None, 0, 8.0]),  # 8: the fused pass at these tiny shapes
        with_targets=r.random() < 0.7,
    )
    if opts["ce_weight"] > 0:
        opts["with_targets"] = True
    extra = dict(k=r.randint(5, 9), bias=r.random() < 0.6, lp_grad=r.random() < 0.3,
                 tw=r.choice(["no-w", "w", "w-grad"]), chunked=r.random() < 0.5)
    return opts, extra


@pytest.mark.parametrize("seed", range(36))
def test_torch_float64_matches_reference(gen, seed, monkeypatch):
    """Loss and the gradients of hidden, weight, bias, differentiable token weights and
    teacher log-probs, for an upstream gradient of random values."""
    opts, extra = draw(seed)
    if extra["chunked"]:  # a few tokens per gathered chunk: the chunk loops
        monkeypatch.setitem(gather.GATHER_BYTES, DEV, extra["k"] * D * 8 * 5)
    lead = (3, 13) if opts["shift"] else 37
    tensors = make(gen, lead, extra["k"], bias=extra["bias"], lp_grad=extra["lp_grad"])
    tw = None if extra["tw"] == "no-w" else weights(gen, tensors[-1].shape, F64,
                                                    grad=extra["tw"] == "w-grad")
    leaves = [x for x in (*tensors[:3], tensors[4], tw) if x is not None and x.requires_grad]
    ref = run_reference(tensors, tw, opts)
    g = torch.randn(ref.shape, generator=gen, dtype=F64).to(DEV)
    want = values(ref, leaves, g)
    assert torch.isfinite(want[0]).all() and want[0].abs().max() > 0
    out = run("torch", tensors, tw, opts)
    assert out.dtype == F64 and out.shape == ref.shape
    for i, (a, r) in enumerate(zip(values(out, leaves, g), want)):
        assert rel_err(a, r) < 1e-10, (opts, extra, i, rel_err(a, r))


@pytest.mark.parametrize("tail", ["drop", "bucket"])
def test_fused_and_zero_budget_agree(gen, tail):
    """"mean" with a budget that fuses the pass ("drop": gradients formed in the forward, one
    backward) and at 0 (may be backpropagated twice): the same loss and gradients."""
    h, w, b, ids, lp, t = make(gen, 37, 6)
    leaves = [h, w, b]

    def call(budget):
        return cutce.linear_sparse_distillation_loss(h, w, ids, lp, t, bias=b, tail=tail,
                                                     ce_weight=0.3, memory_budget=budget,
                                                     impl="torch")

    zero = call(0)
    first = torch.autograd.grad(zero, leaves, retain_graph=True)
    second = torch.autograd.grad(zero, leaves)
    if h.is_cuda:  # index_add_'s float atomics (documented): equal up to the sum's order
        assert all(rel_err(x, y) < 1e-13 for x, y in zip(first, second))
    else:
        assert all(torch.equal(x, y) for x, y in zip(first, second))
    fused = call(8.0)
    assert rel_err(fused, zero) < 1e-13
    again = torch.autograd.grad(fused, leaves, retain_graph=True)
    assert all(rel_err(x, y) < 1e-12 for x, y in zip(again, first))
    if tail == "drop":
        with pytest.raises(RuntimeError, match="already backpropagated"):
            torch.autograd.grad(fused, leaves)
    else:  # the bucket's per-token path
        torch.autograd.grad(fused, leaves)


def test_bfloat16_inputs(gen):
    """16-bit heads: the loss in float32 within float32 rounding of the reference on the same
    (rounded) values; gradients in bfloat16."""
    tensors = make(gen, (3, 13), 8, dtype=torch.bfloat16)
    opts = dict(tail="bucket", ce_weight=0.3, temperature=1.9, shift=True)
    out = run("torch", tensors, None, opts)
    assert out.dtype == torch.float32
    assert rel_err(out, run_reference([as_f64(x) for x in tensors], None, opts)) < 1e-5
    got = torch.autograd.grad(out, tensors[:3])
    t64 = [as_f64(x) for x in tensors]
    want = torch.autograd.grad(run_reference(t64, None, opts), t64[:3])
    for a, r in zip(got, want):
        assert a.dtype == torch.bfloat16 and rel_err(a, r) < 1e-2


# ---- the Triton path (the interpreter on CPU), float32 ----------------------------------------

TRITON_CASES = {
    # "mean", T = 1, the CE term in the same pass: the fused kernels at the default budget
    "drop-mean-merged": dict(tail="drop", ce_weight=0.3, softcap=5.0, logit_scale=0.6,
                             tw="w", memory_budget=8.0),
    # per-token lse at T and at 1 (two passes), shifted rows
    "bucket-none-shift": dict(tail="bucket", reduction="none", ce_weight=0.3, temperature=1.7,
                              shift=True, tw="w-grad"),
    # no full-vocabulary pass for D: the CE's only
    "renorm-sum": dict(tail="renormalize", reduction="sum", ce_weight=0.3, temperature=0.7),
    "drop-sum-T": dict(tail="drop", reduction="sum", temperature=1.9, with_targets=False),
}


@requires_triton
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_matches_reference(gen, case):
    opts = dict(TRITON_CASES[case])
    tw_kind = opts.pop("tw", "no-w")
    lead = (3, 13) if opts.get("shift") else 37
    tensors = make(gen, lead, 7, dtype=torch.float32)
    tw = None if tw_kind == "no-w" else weights(gen, tensors[-1].shape, torch.float32,
                                                grad=tw_kind == "w-grad")
    leaves = [x for x in (*tensors[:3], tw) if x is not None and x.requires_grad]
    t64, tw64 = [as_f64(x) for x in tensors], as_f64(tw)
    ref = run_reference(t64, tw64, opts)
    g = torch.randn(ref.shape, generator=gen, dtype=F64).to(DEV)
    want = values(ref, [x for x in (*t64[:3], tw64) if x is not None and x.requires_grad], g)
    base = values(run("torch", tensors, tw, opts), leaves, g)
    out = run("triton", tensors, tw, opts)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    for i, (a, b, r) in enumerate(zip(values(out, leaves, g), base, want)):
        torch_err = rel_err(b, r)
        assert torch_err < 1e-4, (i, torch_err)
        assert rel_err(a, r) <= 1.5 * torch_err + 2e-6, (i, rel_err(a, r), torch_err)


@requires_triton
@pytest.mark.parametrize("ce_weight", [0.0, 0.4])
def test_triton_soft_targets_in_the_fused_pass(gen, monkeypatch, ce_weight):
    """The reduced "drop" loss runs as one fused pass with the K ids as soft targets (their
    entries rewritten in X): taken here, and exact, also where a token's target is one of its
    own ids (the CE's weight then joins that id's) and with a softcap."""
    from cutce.backends.triton import fused_soft

    calls = []
    rewrite = fused_soft.rewrite_entries
    monkeypatch.setattr(fused_soft, "rewrite_entries",
                        lambda *a, **k: calls.append(1) or rewrite(*a, **k))
    h, w, b, ids, lp, t = make(gen, 41, 6, dtype=torch.float32)
    own = torch.arange(t.numel(), device=t.device) % 2 == 0
    first = ids.gather(1, (ids == IGNORE).to(torch.uint8).argmin(1, keepdim=True))[:, 0]
    t = torch.where(own & (first != IGNORE) & (t != IGNORE), first, t)
    opts = dict(ce_weight=ce_weight, softcap=6.0, reduction="sum", memory_budget=8.0)
    tensors = (h, w, b, ids, lp, t)
    t64 = [as_f64(x) for x in tensors]
    ref = run_reference(t64, None, opts)
    want = values(ref, t64[:3], torch.ones((), dtype=F64))
    base = values(run("torch", tensors, None, opts), [h, w, b], torch.ones(()))
    got = values(run("triton", tensors, None, opts), [h, w, b], torch.ones(()))
    assert calls, "the fused pass with soft targets was not taken"
    for i, (a, c, r) in enumerate(zip(got, base, want)):
        assert rel_err(a, r) <= 1.5 * rel_err(c, r) + 2e-6, (i, rel_err(a, r), rel_err(c, r))


# ---- edge cases -------------------------------------------------------------------------------

def test_nothing_counts_gives_zero_and_zero_gradients(gen):
    h, w, b, ids, lp, t = make(gen, 11, 5)
    for targets, idx in ((torch.full_like(t, IGNORE), ids), (t, torch.full_like(ids, IGNORE))):
        for tail in ("drop", "renormalize", "bucket"):
            out = cutce.linear_sparse_distillation_loss(h, w, idx, lp, targets, bias=b, tail=tail,
                                                        ce_weight=0.3, impl="torch")
            assert out.item() == 0.0
            grads = torch.autograd.grad(out, (h, w, b))
            assert all((x == 0).all() for x in grads), tail


def test_mean_with_zero_weights_is_nan(gen):
    h, w, b, ids, lp, t = make(gen, 11, 5)
    tw = torch.zeros(11, dtype=F64, device=DEV)
    out = cutce.linear_sparse_distillation_loss(h, w, ids, lp, t, token_weights=tw, impl="torch")
    assert torch.isnan(out)
    out = cutce.linear_sparse_distillation_loss(h, w, ids, lp, t, token_weights=tw,
                                                reduction="sum", impl="torch")
    assert out.item() == 0.0


def test_zero_probability_and_full_mass(gen):
    """A -inf log-prob is an id of probability 0: for "drop" the same as padding it; for the
    others the id still belongs to the student's K (renormalization, its mass Q); finite
    gradients. A teacher whose mass on its ids reaches 1 has an empty bucket (the bucket loss
    is the drop loss)."""
    h, w, b, ids, lp, t = make(gen, 11, 6, ignore_frac=0.0)
    live = (ids != IGNORE).nonzero()
    row, col = live[live[:, 0] != 3][0].tolist()
    lp_inf, ids_pad = lp.clone(), ids.clone()
    lp_inf[row, col], ids_pad[row, col] = -math.inf, IGNORE
    for tail in ("drop", "renormalize", "bucket"):
        a = cutce.linear_sparse_distillation_loss(h, w, ids, lp_inf, t, bias=b, tail=tail,
                                                  reduction="none", impl="torch")
        ref = reference(h, w, ids, lp_inf, t, bias=b, tail=tail, reduction="none")
        g = torch.randn(a.shape, generator=gen, dtype=F64).to(DEV)
        for x, y in zip(values(a, [h, w, b], g), values(ref, [h, w, b], g)):
            assert torch.isfinite(x).all() and rel_err(x, y) < 1e-10, tail
        if tail == "drop":
            padded = cutce.linear_sparse_distillation_loss(h, w, ids_pad, lp, t, bias=b,
                                                           reduction="none", impl="torch")
            assert rel_err(a, padded) < 1e-13
    full = torch.where(ids != IGNORE, math.log(0.6), lp)  # sum of p >= 1 where >= 2 ids
    outs = [cutce.linear_sparse_distillation_loss(h, w, ids, full, t, bias=b, tail=tail,
                                                  reduction="none", impl="torch")
            for tail in ("drop", "bucket")]
    several = ((ids != IGNORE).sum(-1) >= 2) & (t != IGNORE)
    assert several.any() and torch.equal(outs[0][several], outs[1][several])
    assert all(torch.isfinite(x).all() for x in torch.autograd.grad(outs[1].sum(), (h, w, b)))


def test_int32_ids_and_targets(gen):
    h, w, b, ids, lp, t = make(gen, 11, 5)
    a = cutce.linear_sparse_distillation_loss(h, w, ids.int(), lp, t.int(), ce_weight=0.3,
                                              impl="torch")
    assert a == cutce.linear_sparse_distillation_loss(h, w, ids, lp, t, ce_weight=0.3, impl="torch")


def test_bad_inputs_raise(gen):
    h, w, b, ids, lp, t = make(gen, (2, 6), 5)
    call = cutce.linear_sparse_distillation_loss
    bad = [
        (dict(teacher_ids=ids.float()), r"teacher_ids dtype: expected torch.int64 or torch.int32"),
        (dict(teacher_ids=ids[:, :5]), r"teacher_ids: expected shape \(2, 6\) \+ \(K,\) with K >= 1"),
        (dict(teacher_ids=ids[..., :0], teacher_logprobs=lp[..., :0]),
         r"teacher_ids: expected shape .* got \(2, 6, 0\)"),
        (dict(teacher_logprobs=lp[..., :4]), r"teacher_logprobs: expected teacher_ids' shape"),
        (dict(teacher_logprobs=ids), r"teacher_logprobs dtype: expected a float dtype"),
        (dict(teacher_ids=[1, 2]), r"teacher_ids: expected a torch.Tensor, got list"),
        (dict(tail="top"), r"tail: expected one of \('drop', 'renormalize', 'bucket'\), got 'top'"),
        (dict(temperature=0.0), r"temperature: expected a number > 0.0, got 0.0"),
        (dict(ce_weight=1.5), r"ce_weight: expected a number <= 1.0, got 1.5"),
        (dict(ce_weight=0.3, targets=None), r"targets: expected a tensor of class indices when ce_weight > 0"),
        (dict(reduction="avg"), r"reduction: expected one of"),
        (dict(impl="cuda"), r"impl: expected one of"),
        (dict(shift=1), r"shift: expected a bool, got 1"),
        (dict(softcap=-1.0), r"softcap: expected a number > 0.0"),
        (dict(token_weights=torch.ones(2, 5, dtype=F64)), r"token_weights: expected targets' shape"),
        (dict(targets=t[:, :5]), r"targets: expected shape \(2, 6\)"),
        (dict(weight=w[:, :7]), r"weight: expected shape \(V, 53\)"),
    ]
    for change, message in bad:
        args = {**dict(hidden=h, weight=w, teacher_ids=ids, teacher_logprobs=lp, targets=t),
                **change}
        impl = args.pop("impl", "torch")
        with pytest.raises(ValueError, match=message):
            call(args.pop("hidden"), args.pop("weight"), args.pop("teacher_ids"),
                 args.pop("teacher_logprobs"), args.pop("targets"), impl=impl, **args)
    # an explicit impl="triton" that cannot run raises, also where no pass would use it
    with pytest.raises(RuntimeError, match="impl='triton' cannot run.*float64"):
        call(h, w, ids, lp, tail="renormalize", impl="triton")


def test_bad_ids_raise(gen):
    h, w, b, ids, lp, t = make(gen, (2, 6), 5)
    live = (ids != IGNORE).nonzero()
    i, j, k = live[0].tolist()
    for value, message in ((V, rf"teacher_ids: expected class ids in \[0, {V}\) or ignore_index=-100, got {V}"),
                           (-1, r"teacher_ids: expected class ids .* got -1")):
        bad = ids.clone()
        bad[i, j, k] = value
        with pytest.raises(ValueError, match=message):
            cutce.linear_sparse_distillation_loss(h, w, bad, lp, t, impl="torch")
    row = ((ids != IGNORE).sum(-1) >= 2).nonzero()[0].tolist()
    cols = (ids[row[0], row[1]] != IGNORE).nonzero()[:, 0]
    bad = ids.clone()
    bad[row[0], row[1], cols[1]] = bad[row[0], row[1], cols[0]]
    with pytest.raises(ValueError, match=r"teacher_ids: expected distinct ids in each token's list"):
        cutce.linear_sparse_distillation_loss(h, w, bad, lp, t, impl="torch")
    # an id equal to ignore_index repeated is padding, not a repeat
    cutce.linear_sparse_distillation_loss(h, w, ids, lp, t, impl="torch")


def test_torch_compile_aot_eager(gen):
    """Under torch.compile (aot_eager: seconds on CPU) the loss and gradients are eager's."""
    h, w, b, ids, lp, t = make(gen, 37, 6, dtype=torch.float32)

    def f(h, w, b):
        return cutce.linear_sparse_distillation_loss(h, w, ids, lp, t, bias=b, ce_weight=0.3,
                                                     temperature=1.5, tail="bucket", impl="torch")

    got = values(torch.compile(f, backend="aot_eager")(h, w, b), [h, w, b], 1.0)
    want = values(f(h, w, b), [h, w, b], 1.0)
    assert all(rel_err(a, r) < 1e-6 for a, r in zip(got, want))


# ---- CUDA (skipped on CPU): bfloat16 through the Triton kernels at a moderate shape -----------

@gpu
@pytest.mark.parametrize("tail", ["drop", "renormalize", "bucket"])
def test_cuda_bfloat16(tail):
    """bf16 heads, impl="auto" (Triton): within float32 rounding of float64 on the same rounded
    inputs for the loss, within bf16 rounding for the gradients."""
    g = torch.Generator().manual_seed(0)
    n, d, v, k = 2048, 256, 8192, 64
    h = torch.randn(n, d, generator=g).bfloat16().cuda().requires_grad_()
    w = (torch.randn(v, d, generator=g) * (3.0 / d**0.5)).bfloat16().cuda().requires_grad_()
    lp, ids = (torch.randn(n, v, generator=g) * 4.0).log_softmax(-1).topk(k)
    ids, lp, t = ids.cuda(), lp.cuda(), torch.randint(0, v, (n,), generator=g).cuda()
    opts = dict(tail=tail, temperature=1.5, ce_weight=0.2)
    out = cutce.linear_sparse_distillation_loss(h, w, ids, lp, t, **opts)
    got = [out] + list(torch.autograd.grad(out, (h, w)))
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    ref = reference(h64, w64, ids, lp, t, **opts)
    want = [ref] + list(torch.autograd.grad(ref, (h64, w64)))
    assert rel_err(got[0], want[0]) < 1e-4
    assert all(rel_err(a, b) < 1e-2 for a, b in zip(got[1:], want[1:]))


def test_example_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "sparse_distillation.py")],
                          cwd=ROOT, env=example_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout


def test_benchmark_cpu_smoke(tmp_path):
    """The GPU benchmark's logic at tiny sizes: every tail and provider row, exact errors."""
    import json

    proc = subprocess.run([sys.executable, "benchmarks/sparse_distill.py", "--cpu-smoke", "--out",
                           str(tmp_path)], cwd=ROOT, env=example_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    doc = json.loads((tmp_path / "sparse_distill_cpu.json").read_text())
    assert doc["benchmark"] == "sparse_distill" and doc["meta"]["device"] == "cpu"
    rows = doc["rows"]
    assert {(r["tail"], r["provider"]) for r in rows} == {("-", "cutce-ce")} | {
        (t, p) for t in ("drop", "renormalize", "bucket") for p in ("cutce", "torch", "cutce-torch")}
    ce = [r for r in rows if r["provider"] == "cutce-ce"]
    assert ce[0]["status"] == "ok" and ce[0]["ms"] > 0  # the yardstick: a time, no errors
    rows = [r for r in rows if r["provider"] != "cutce-ce"]
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0, r
        assert max(r["loss_err"], r["dE_err"], r["dC_err"]) < 1e-5, r
