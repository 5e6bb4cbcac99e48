"""linear_distillation_loss with both heads split by vocabulary, on CPU gloo, against the
single-process torch path on the full tensors.

One spawn of 3 processes serves every test: each worker runs all cases on the 3-rank world group
(V = 131 split 40/50/41), on a 2-rank subgroup of global ranks [1, 2] (70/61; group ranks differ
from global ranks there), on Shard(0) DTensor weights (torch.chunk's 44/44/43), and the calls that
must raise on every rank alike; it writes the failures it collected to a JSON file, which the
tests read. Float64 throughout, tolerance 1e-10; the subgroup's calls run in chunks of 5 tokens.
"""

from __future__ import annotations

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist

import cutce
from cutce.backends.pytorch import distill as torch_distill
from spawn import expect_value_error as _raises
from spawn import finish_worker, run_workers

WORLD = 3
V, N, DS, DT = 131, 23, 12, 7
SIZES = {"world3": [40, 50, 41], "world2": [70, 61]}
TOL = dict(rtol=1e-10, atol=1e-10)

# Each case: the call's options, plus switches read by _inputs/_call: "bias" (both heads),
# "teacher_grad" (trainable teacher), "token_weights" (True, or "grad": differentiated too),
# "no_targets", "all_ignored", "order" = "reversed" (slices handed out in reverse, vocab_start).
CASES = [
    {"beta": 0.0},
    {"beta": 0.37, "bias": True},
    {"beta": 1.0, "ce_weight": 0.3, "teacher_grad": True},
    {"beta": 0.37, "ce_weight": 0.4, "student_softcap": 3.0, "teacher_softcap": 2.5,
     "temperature": 1.7, "bias": True, "teacher_grad": True, "token_weights": True},
    {"beta": 0.0, "ce_weight": 0.25, "temperature": 0.6, "reduction": "sum", "bias": True,
     "teacher_grad": True, "teacher_softcap": 4.0},
    {"beta": 1.0, "reduction": "none", "student_softcap": 4.0, "bias": True, "teacher_grad": True},
    {"beta": 0.37, "reduction": "none", "ce_weight": 0.5, "token_weights": True},
    {"beta": 0.0, "reduction": "none", "temperature": 2.0, "ignore_index": 5, "teacher_grad": True},
    {"beta": 0.37, "ce_weight": 1.0, "teacher_grad": True, "bias": True},
    {"beta": 0.37, "no_targets": True, "teacher_grad": True},
    {"beta": 1.0, "no_targets": True, "reduction": "none", "shift": True},
    {"beta": 0.37, "shift": True, "bias": True, "teacher_grad": True, "ce_weight": 0.2},
    {"beta": 0.0, "reduce_hidden_grad": False, "teacher_grad": True, "bias": True,
     "ce_weight": 0.1},
    {"beta": 0.37, "order": "reversed", "ce_weight": 0.3, "teacher_grad": True, "bias": True},
    {"beta": 1.0, "all_ignored": True, "teacher_grad": True},
    {"beta": 0.37, "student_logit_scale": 0.8, "teacher_logit_scale": 1.3, "impl": "auto"},
    {"beta": 1.0, "token_weights": "grad", "ce_weight": 0.3, "reduction": "sum", "bias": True},
]
_SWITCHES = ("bias", "teacher_grad", "token_weights", "no_targets", "all_ignored", "order")


def _inputs(case, seed=0):
    """Full float64 inputs, identical on every rank (same seed); nothing is zero."""
    g = torch.Generator().manual_seed(seed)
    lead = (N + 1,) if case.get("shift") else (N,)  # one sequence: N tokens after the shift
    hs = torch.randn(*lead, DS, generator=g, dtype=torch.float64)
    ws = torch.randn(V, DS, generator=g, dtype=torch.float64) * 0.7
    ht = torch.randn(*lead, DT, generator=g, dtype=torch.float64)
    wt = torch.randn(V, DT, generator=g, dtype=torch.float64)
    bs = torch.randn(V, generator=g, dtype=torch.float64)
    bt = torch.randn(V, generator=g, dtype=torch.float64)
    ignore = case.get("ignore_index", -100)
    t = torch.randint(0, V, lead, generator=g)
    t[[2, 9, 17]] = ignore
    if case.get("all_ignored"):
        t.fill_(ignore)
    tw = torch.rand(lead, generator=g, dtype=torch.float64) + 0.5
    up = torch.randn(lead, generator=g, dtype=torch.float64)  # upstream gradient for "none"
    return hs, ws, bs, ht, wt, bt, t, tw, up


def _leaf(x, grad=True):
    return None if x is None else x.detach().clone().requires_grad_(grad)


def _call(case, hs, ws, bs, ht, wt, bt, t, tw, up, **dist_kw):
    """Call and backprop; returns (loss, [grads of hs, ws, bs, ht, wt, bt, tw] or None each)."""
    opts = {k: v for k, v in case.items() if k not in _SWITCHES}
    opts.setdefault("impl", "torch")
    tg = bool(case.get("teacher_grad"))
    leaves = [_leaf(hs), ws, bs if case.get("bias") else None, _leaf(ht, tg), wt,
              bt if case.get("bias") else None,
              _leaf(tw, case.get("token_weights") == "grad") if case.get("token_weights") else None]
    out = cutce.linear_distillation_loss(
        leaves[0], leaves[1], leaves[3], leaves[4], None if case.get("no_targets") else t,
        student_bias=leaves[2], teacher_bias=leaves[5], token_weights=leaves[6], **opts, **dist_kw)
    total = (out * up[1:] if case.get("shift") else out * up).sum() \
        if case.get("reduction") == "none" else 1.3 * out
    total.backward()
    return out, [None if x is None or not x.requires_grad else x.grad for x in leaves]


def _check(name, got, want, failures):
    try:
        torch.testing.assert_close(got, want, **TOL)
    except AssertionError as e:
        failures.append(f"{name}: {str(e).splitlines()[0:3]}")


def _compare(name, got, want, sl, failures):
    loss, grads = got
    _check(f"{name} loss", loss, want[0], failures)
    for gname, g, w, sliced in zip(("dhs", "dws", "dbs", "dht", "dwt", "dbt", "dtw"), grads,
                                   want[1], (False, True, True, False, True, True, False)):
        if (g is None) != (w is None):
            failures.append(f"{name} {gname}: {'missing' if g is None else 'unexpected'}")
        elif g is not None:
            _check(f"{name} {gname}", g, w[sl] if sliced else w, failures)


def _vocab_cases(group, sizes):
    """Every case on this group; returns failure strings."""
    failures = []
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    for case in CASES:
        name = f"{case}"
        try:
            hs, ws, bs, ht, wt, bt, t, tw, up = _inputs(case)
            tg = bool(case.get("teacher_grad"))
            want = _call(case, hs, _leaf(ws), _leaf(bs), ht, _leaf(wt, tg), _leaf(bt, tg), t, tw,
                         up)
            block = world - 1 - rank if case.get("order") == "reversed" else rank
            start = sum(sizes[:block])
            sl = slice(start, start + sizes[block])
            kw = {"vocab_group": group}
            if case.get("order") == "reversed":
                kw["vocab_start"] = start
            split = {k: v for k, v in case.items() if k != "reduce_hidden_grad"}
            if "reduce_hidden_grad" in case:
                kw["reduce_hidden_grad"] = case["reduce_hidden_grad"]
            got = _call(split, hs, _leaf(ws[sl]), _leaf(bs[sl]), ht, _leaf(wt[sl], tg),
                        _leaf(bt[sl], tg), t, tw, up, **kw)
            if case.get("reduce_hidden_grad") is False:  # the caller's own reduction
                for i in (0, 3):
                    if got[1][i] is not None:
                        got[1][i] = got[1][i].clone()
                        dist.all_reduce(got[1][i], group=group)
            _compare(name, got, want, sl, failures)
        except Exception:
            failures.append(f"{name}: {traceback.format_exc(limit=4)}")
    return failures


def _zero_token_weight(group, sizes):
    """A valid token of weight 0 adds nothing, and d(sum)/dw_i is still its row's loss."""
    failures = []
    case = {"beta": 0.37, "ce_weight": 0.2, "token_weights": "grad", "reduction": "sum"}
    hs, ws, bs, ht, wt, bt, t, tw, up = _inputs(case)
    tw[[4, 11]] = 0.0
    rank = dist.get_rank(group)
    sl = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    rows = cutce.linear_distillation_loss(hs, ws, ht, wt, t, beta=0.37, ce_weight=0.2,
                                          reduction="none", impl="torch")
    got = _call(case, hs, _leaf(ws[sl]), bs, ht, wt[sl], bt, t, tw, up, vocab_group=group)
    _check("zero token weight: loss", got[0], (rows * tw).sum(), failures)
    _check("zero token weight: d/dw", got[1][6], 1.3 * rows, failures)
    return failures



def _errors(group, sizes):
    """Calls that must raise on every rank alike (no rank left waiting in a collective)."""
    failures = []
    rank = dist.get_rank(group)
    hs, ws, bs, ht, wt, bt, t, tw, up = _inputs({})
    sl = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    other = sizes[::-1]  # same sizes on rank 1 only: the mismatch is elsewhere for some ranks
    tsl = slice(sum(other[:rank]), sum(other[:rank + 1]))

    def call(w_s, w_t, h_t=ht, **kw):
        return cutce.linear_distillation_loss(hs, w_s, h_t, w_t, t, **{"impl": "torch", **kw})

    _raises("teacher split unlike the student's", lambda: call(ws[sl], wt[tsl], vocab_group=group,
            beta=0.37), "teacher_weight: expected the student_weight's vocabulary split", failures)
    _raises("teacher unsplit", lambda: call(ws[sl], wt, vocab_group=group),
            "teacher_weight: expected", failures)
    _raises("impl=triton", lambda: call(ws[sl], wt[sl], vocab_group=group, impl="triton"),
            "impl: expected 'torch' or 'auto' with a vocabulary split", failures)
    _raises("ranks disagree on beta", lambda: call(ws[sl], wt[sl], vocab_group=group,
            beta=0.0 if rank == 0 else 0.37), "ranks disagree on beta: rank 0 has 0.0",
            failures)
    _raises("ranks disagree on teacher grad", lambda: call(
            ws[sl], wt[sl], ht.clone().requires_grad_(rank == 0), vocab_group=group),
            "ranks disagree on teacher_hidden.requires_grad: rank 0 has True", failures)
    _raises("teacher hidden differs per rank", lambda: call(ws[sl], wt[sl], ht + rank,
            vocab_group=group), "same hidden states on every rank", failures)
    return failures


def _dtensor_cases():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    failures = []
    mesh = init_device_mesh("cpu", (WORLD,))
    rank = dist.get_rank()
    case = {"beta": 0.37, "ce_weight": 0.3, "bias": True, "teacher_grad": True,
            "student_softcap": 3.0, "temperature": 1.4, "token_weights": True}
    hs, ws, bs, ht, wt, bt, t, tw, up = _inputs(case, seed=1)
    want = _call(case, hs, _leaf(ws), _leaf(bs), ht, _leaf(wt), _leaf(bt), t, tw, up)
    chunks = [len(c) for c in torch.arange(V).chunk(WORLD)]  # DTensor's uneven split: 44/44/43
    sl = slice(sum(chunks[:rank]), sum(chunks[:rank + 1]))

    def shard(x):
        return distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()

    try:  # both heads Shard(0) DTensors, replicated DTensor hidden states
        parts = [shard(x) for x in (ws, bs, wt, bt)]
        hd = distribute_tensor(hs, mesh, [Replicate()])
        got = _call(case, hd, parts[0], parts[1], ht, parts[2], parts[3], t, tw, up)
        got[1][1:3] = [p.grad.to_local() for p in parts[:2]]
        got[1][4:6] = [p.grad.to_local() for p in parts[2:]]
        got[1][0] = got[1][0].to_local()  # a replicated DTensor, as hidden was
        _compare("Shard(0) pair", got, want, sl, failures)
    except Exception:
        failures.append(f"Shard(0) pair: {traceback.format_exc(limit=4)}")
    try:  # a Shard(0) student with plain teacher slices holding the same rows
        parts = [shard(ws), shard(bs)]
        got = _call(case, hs, parts[0], parts[1], ht, _leaf(wt[sl]), _leaf(bt[sl]), t, tw, up)
        got[1][1:3] = [p.grad.to_local() for p in parts]
        _compare("Shard(0) student, plain teacher", got, want, sl, failures)
    except Exception:
        failures.append(f"Shard(0) student, plain teacher: {traceback.format_exc(limit=4)}")
    sizes = SIZES["world3"]
    own = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    _raises("Shard(0) teacher, student split otherwise", lambda: cutce.linear_distillation_loss(
            hs, ws[own], ht, distribute_tensor(wt, mesh, [Shard(0)]), t,
            vocab_group=dist.group.WORLD, impl="torch"),
            "teacher_weight: expected the student_weight's vocabulary split", failures)
    _raises("Shard(0) teacher, unsplit student", lambda: cutce.linear_distillation_loss(
            hs, ws, ht, distribute_tensor(wt, mesh, [Shard(0)]), t, impl="torch"),
            "teacher_weight placements: expected no Shard(0)", failures)
    return failures


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)  # 3 processes share 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    out = {}

    def section(name, fn):
        try:
            out[name] = fn()
        except Exception:
            out[name] = [traceback.format_exc(limit=4)]

    try:
        sub = dist.new_group([1, 2])  # every rank must call new_group
        section("world3", lambda: _vocab_cases(dist.group.WORLD, SIZES["world3"])
                + _zero_token_weight(dist.group.WORLD, SIZES["world3"]))
        # a few rows per chunk on the subgroup: the chunk loops, gradients summed over chunks
        chunk = torch_distill.CHUNK_BYTES["cpu"]
        torch_distill.CHUNK_BYTES["cpu"] = 70 * 8 * torch_distill._TEMPS * 5
        section("world2", lambda: _vocab_cases(sub, SIZES["world2"]) if rank in (1, 2) else [])
        torch_distill.CHUNK_BYTES["cpu"] = chunk
        section("errors", lambda: _errors(dist.group.WORLD, SIZES["world3"]))
        section("dtensor", _dtensor_cases)
    finally:
        finish_worker(rank, outdir, out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers(_worker, (WORLD,), WORLD, tmp_path_factory.mktemp("dist_distill"), 180,
                       "distributed distillation workers")


@pytest.mark.parametrize("section", ["world3", "world2", "errors", "dtensor"])
def test_equals_single_process(results, section):
    failures = [f"rank {r}: {msg}" for r, res in enumerate(results) for msg in res[section]]
    assert not failures, "\n".join(failures[:20])
