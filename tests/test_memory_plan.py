"""Planning against the device's free memory: memory_budget="auto", the fallback to the minimum
when a plan does not fit, and the out-of-memory error when nothing fits. The planner is pure
arithmetic (tested directly); the api's use of it is tested on CPU with the free-memory reading
replaced, since CPU tensors have no device memory to read."""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
import warnings

import pytest
import torch

import cutce
from cutce import backends
from cutce.engine import planner
from cutce.engine.problem import Problem
from reference import make_inputs
from triton_support import DEV, gpu, requires_triton

GiB = 2**30
GEMMA = Problem(8192, 256000, 2304, torch.bfloat16, reduced=True)


def _settle(budget, free, p=GEMMA):
    return planner.settle(dataclasses.replace(p, memory_budget=budget), "triton", free)


def test_unknown_free_memory_keeps_the_budget():
    """CPU tensors and torch.compile read no free memory: "auto" is the default there."""
    assert _settle(None, None)[:2] == (planner.plan(GEMMA, "triton"), None)
    assert _settle("auto", None)[0] == planner.plan(GEMMA, "triton")


def test_auto_is_the_largest_budget_that_fits_and_deterministic():
    for free in (80 * GiB, 6 * GiB, 3.2 * GiB):
        plan, budget, why = _settle("auto", int(free))
        assert why is None and _settle("auto", int(free)) == (plan, budget, why)
        assert budget == pytest.approx(planner.auto_budget(GEMMA, int(free)))
        used = planner.need_bytes(dataclasses.replace(GEMMA, memory_budget=budget), plan, "triton")
        assert used <= planner.usable_bytes(int(free))
    # ample memory: fused, in fewer (larger) chunks than the default's; little: recompute
    assert _settle("auto", 80 * GiB)[0].chunk_n > planner.plan(GEMMA, "triton").chunk_n
    assert not _settle("auto", int(3.2 * GiB))[0].fused


def test_a_plan_that_does_not_fit_falls_back_to_the_minimum():
    plan, budget, why = _settle(None, int(3.2 * GiB))
    assert plan.strategy == "recompute" and budget == 0.0
    assert "memory_budget=None" in why and "GiB" in why and "memory_budget=0" in why
    assert _settle(None, 80 * GiB)[2] is None  # fits: no fallback
    assert _settle(2.0, int(3.2 * GiB))[1] == 0.0  # an explicit budget falls back too


def test_nothing_fits_raises_out_of_memory_with_the_need():
    least = planner.need_bytes(dataclasses.replace(GEMMA, memory_budget=0.0), planner.RECOMPUTE,
                               "triton")
    for budget in (None, "auto", 0.0):
        with pytest.raises(torch.OutOfMemoryError, match=r"needs about 1\.\d\d GiB"):
            _settle(budget, least - 1)
    forward_only = dataclasses.replace(GEMMA, need_h=False, need_w=False)
    assert planner.settle(forward_only, "triton", 1)[2] is None  # no gradients: nothing to hold


def test_distillation_plans_against_both_heads():
    p = Problem(8192, 151936, 896, torch.bfloat16, reduced=True, dt=3584)
    assert _settle(None, 80 * GiB, p)[0] == planner.plan(p, "triton")
    plan, budget, why = _settle(None, int(0.7 * GiB), p)
    assert plan.strategy == "recompute" and budget == 0.0 and why


# ---- through the api, on CPU with the free-memory reading replaced ---------------------------

@pytest.fixture
def free(monkeypatch):
    """Set the free device memory the api reads (bytes); the warn-once memory is reset."""
    state = {"bytes": None}
    monkeypatch.setattr(backends, "free_memory", lambda device: state["bytes"])
    monkeypatch.setattr(backends.resources, "_MEMORY_WARNED", set())
    return state


def _loss_and_grads(h, w, t, impl="torch", **kw):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = cutce.linear_cross_entropy(h, w, t, impl=impl, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def _free_for(usable):
    """The free bytes whose usable part (after the safety margin) is ``usable``."""
    return int((usable + planner.SAFETY_BYTES) / (1.0 - planner.SAFETY_FRACTION)) + 1


@requires_triton
def test_auto_picks_what_fits_without_a_warning(gen, free):
    """"auto" with free memory between the Triton fused strategy's need (it holds a chunk of
    logit gradients) and the recompute strategy's: the call plans the recompute strategy (what
    fits: nothing to warn about) and gives memory_budget=0's results bit for bit; an explicit
    budget whose plan the known free memory cannot hold would warn (planner tests above)."""
    h, w, t, _, _ = make_inputs(gen, 61, 24, 307, torch.float32, ignore_frac=0.2)
    h, w, t = h.to(DEV), w.to(DEV), t.to(DEV)
    p = Problem(61, 307, 24, torch.float32, reduced=True, memory_budget=100.0)
    fused = planner.plan(p, "triton")
    least = planner.need_bytes(dataclasses.replace(p, memory_budget=0.0), planner.RECOMPUTE,
                               "triton")
    need = planner.need_bytes(p, fused, "triton")
    assert fused.fused and least < need
    free["bytes"] = _free_for((least + need) // 2)
    want = _loss_and_grads(h, w, t, "triton", memory_budget=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            got = _loss_and_grads(h, w, t, "triton", memory_budget="auto")
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not [x for x in seen if "memory" in str(x.message)]
    free["bytes"] = _free_for(2 * need)  # ample: the fused strategy, the same loss
    got = _loss_and_grads(h, w, t, "triton", memory_budget="auto")
    torch.testing.assert_close(got[0], want[0])


def test_numeric_budgets_read_no_memory_and_fall_back_on_oom(gen, free, monkeypatch):
    """A numeric budget costs no memory reading per call; when its fused strategy runs out of
    memory, the call reruns at the minimum, warns once and gives memory_budget=0's results."""
    from cutce.backends.pytorch import ce
    h, w, t, _, _ = make_inputs(gen, 61, 24, 307, torch.float32, ignore_frac=0.2)
    monkeypatch.setattr(backends, "free_memory", lambda device: pytest.fail("memory read"))
    want = _loss_and_grads(h, w, t, memory_budget=0)

    def out_of_memory(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(ce, "fused_loss", out_of_memory)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            for a, b in zip(_loss_and_grads(h, w, t, memory_budget=100.0), want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len([x for x in seen if "ran out of device memory" in str(x.message)]) == 1


def test_api_auto_runs_and_raises_when_nothing_fits(gen, free):
    h, w, t, _, _ = make_inputs(gen, 61, 24, 307, torch.float32)
    want = _loss_and_grads(h, w, t)
    free["bytes"] = 64 * GiB
    for a, b in zip(_loss_and_grads(h, w, t, memory_budget="auto"), want):
        torch.testing.assert_close(a, b)
    free["bytes"] = 1000
    with pytest.raises(torch.OutOfMemoryError, match="even at memory_budget=0"):
        _loss_and_grads(h, w, t, memory_budget="auto")
    with torch.no_grad():  # no gradients to hold: runs
        cutce.linear_cross_entropy(h, w, t, impl="torch", memory_budget="auto")


def test_api_distillation_and_log_probs_accept_auto(gen, free):
    h, w, t, _, _ = make_inputs(gen, 29, 16, 131, torch.float32)
    ht, wt = torch.randn(29, 20, generator=gen), torch.randn(131, 20, generator=gen)
    free["bytes"] = 64 * GiB
    a = cutce.linear_distillation_loss(h, w, ht, wt, t, memory_budget="auto", impl="torch")
    b = cutce.linear_distillation_loss(h, w, ht, wt, t, impl="torch")
    torch.testing.assert_close(a, b)
    lp = cutce.linear_log_probs(h, w, t, memory_budget="auto", impl="torch")
    torch.testing.assert_close(lp, cutce.linear_log_probs(h, w, t, impl="torch"))


def test_the_plan_is_visible_in_a_debug_log(gen, free, caplog):
    h, w, t, _, _ = make_inputs(gen, 29, 16, 131, torch.float32)
    free["bytes"] = 64 * GiB
    with caplog.at_level("DEBUG", logger="cutce"):
        cutce.linear_cross_entropy(h, w, t, impl="torch", memory_budget="auto")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cutce plan")]
    assert "loss N=29 V=131 D=16" in line and "memory_budget='auto' ->" in line and "fused" in line


def test_bad_memory_budget_string_raises(gen):
    h, w, t, _, _ = make_inputs(gen, 5, 8, 11, torch.float32)
    with pytest.raises(ValueError, match='memory_budget: expected None, "auto" or a number'):
        cutce.linear_cross_entropy(h, w, t, memory_budget="max")


# ---- on the GPU: a ballast tensor takes the memory away --------------------------------------

@gpu
@pytest.mark.gpu
def test_gpu_ballast_falls_back_then_raises():
    """Most of the device's memory taken by a ballast tensor: the default plan (fused, with its
    float32 dC accumulator) runs out of memory, so the call reruns at the minimum strategy,
    warns once and gives memory_budget=0's loss and gradients bit for bit; with too little even
    for that, it raises torch.OutOfMemoryError saying how much it needs. In a process of its
    own: blocks that earlier tests leave cached beside live tensors count as free memory but
    cannot hold the call's large tensors (after test_triton.py it failed where it passes alone).
    The suite's process first returns what its allocator caches: the child reads the driver's
    free bytes, and after test_kept_logits.py this process still held 77.6 of an H100's 79.2 GiB
    in cached blocks, so the child could not allocate its inputs."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    here = os.path.dirname(os.path.abspath(__file__))
    path = [here, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    path = os.pathsep.join(os.path.abspath(x) for x in path if x)
    run = subprocess.run([sys.executable, "-c", "import test_memory_plan as m; m._ballast()"],
                         env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True,
                         timeout=600, check=False)
    held = torch.cuda.memory_allocated() / 2**30
    assert run.returncode == 0, f"(this process holds {held:.2f} GiB) " + (run.stdout + run.stderr)[-4000:]


def _ballast():
    """test_gpu_ballast_falls_back_then_raises's body, run in a fresh process."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 4096, 2304, 128000
    h = (torch.randn(n, d, device="cuda", generator=g) * 0.5).bfloat16()
    w = (torch.randn(v, d, device="cuda", generator=g) * 0.05).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    p = Problem(n, v, d, torch.bfloat16, reduced=True)
    least = planner.need_bytes(dataclasses.replace(p, memory_budget=0.0), planner.RECOMPUTE,
                               "triton")
    need = planner.need_bytes(p, planner.plan(p, "triton"), "triton")
    # held on the host: freed blocks beside live results stay cached in segments that
    # empty_cache cannot return, and a ballast of "free" bytes would not fit in one piece
    want = [x.cpu() for x in _loss_and_grads(h, w, t, "triton", memory_budget=0)]

    def leave(usable):
        """Ballast pieces that leave about ``usable`` bytes of what a call may allocate: one
        piece short of the driver's free bytes (all of them in one piece fail to allocate), then
        smaller ones out of the rest and of the blocks the allocator caches beside live tensors
        (empty_cache cannot return those, and a call may use them)."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        target, held = _free_for(usable), []
        piece = torch.cuda.mem_get_info()[0] - 64 * 2**20
        while piece >= 2**20 and (extra := backends.free_memory(torch.device("cuda")) - target) > 0:
            try:
                held.append(torch.empty(min(piece, extra), dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                piece //= 2
            piece = min(piece, 32 * 2**20)
        return held

    assert need > 2 * least
    ballast = leave(int(least * 1.2))  # the default's float32 dC accumulator alone cannot fit
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            got = _loss_and_grads(h, w, t, "triton")
            for a, b in zip(got, want):
                torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)
            del got, a  # the loop variable still held dC (0.55 GiB) into the next call
    assert len([x for x in seen if "minimum-memory" in str(x.message)]) == 1
    del ballast
    ballast = leave(0)
    with pytest.raises(torch.OutOfMemoryError, match="GiB of device memory even at memory_budget=0"):
        _loss_and_grads(h, w, t, "triton")
    del ballast
