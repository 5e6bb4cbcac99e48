"""linear_sparse_distillation_loss with the student's head split by vocabulary, on CPU gloo,
against the single-process torch path on the full tensors (itself checked against float64 in
test_sparse_distill.py).

One spawn of 2 processes serves every test: each worker runs the cases on V = 97 split 40/57
(and in reverse order with vocab_start), on a Shard(0) DTensor weight (torch.chunk's 49/48), and
the calls that must raise on every rank alike; it writes the failures it collected to a JSON
file, which the tests read. Float64 throughout, tolerance 1e-10.
"""

from __future__ import annotations

import datetime
import math
import traceback

import pytest
import torch
import torch.distributed as dist

import cutce
from spawn import expect_value_error as _raises
from spawn import finish_worker, run_workers

WORLD = 2
V, N, D, K = 97, 19, 11, 6
SIZES = [40, 57]
TOL = dict(rtol=1e-10, atol=1e-10)

# Each case: the call's options, plus switches: "bias", "token_weights", "no_targets",
# "order" = "reversed" (slices handed out in reverse, vocab_start), "reduce_hidden_grad".
CASES = [
    {"tail": "drop", "ce_weight": 0.3, "bias": True, "token_weights": True},
    {"tail": "renormalize", "reduction": "sum", "bias": True},  # no cross-entropy pass at all
    {"tail": "bucket", "reduction": "none", "temperature": 1.7, "ce_weight": 0.3, "softcap": 4.0},
    {"tail": "drop", "shift": True, "temperature": 0.7, "no_targets": True, "logit_scale": 0.6},
    {"tail": "renormalize", "ce_weight": 0.4, "temperature": 1.3, "order": "reversed",
     "bias": True},
    {"tail": "bucket", "reduce_hidden_grad": False, "ce_weight": 0.2, "bias": True},
]
_SWITCHES = ("bias", "token_weights", "no_targets", "order", "reduce_hidden_grad")


def _inputs(case, seed=0):
    """Full float64 inputs, identical on every rank (same seed): a teacher's top-K, ragged."""
    g = torch.Generator().manual_seed(seed)
    lead = (N + 1,) if case.get("shift") else (N,)
    h = torch.randn(*lead, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(V, generator=g, dtype=torch.float64)
    lp, ids = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * 2).log_softmax(-1).topk(K)
    pad = torch.arange(K) >= torch.randint(1, K + 1, (*lead, 1), generator=g)
    ids, lp = ids.masked_fill(pad, -100), lp.masked_fill(pad, math.nan)
    t = torch.randint(0, V, lead, generator=g)
    t[[2, 9]] = -100
    tw = torch.rand(lead, generator=g, dtype=torch.float64) + 0.5
    up = torch.randn(lead, generator=g, dtype=torch.float64)  # upstream gradient for "none"
    return h, w, b, ids, lp, t, tw, up


def _call(case, h, w, b, ids, lp, t, tw, up, **dist_kw):
    """Call and backprop; returns (loss, [grads of h, w, b])."""
    opts = {k: v for k, v in case.items() if k not in _SWITCHES}
    h = h.detach().clone().requires_grad_()
    out = cutce.linear_sparse_distillation_loss(
        h, w, ids, lp, None if case.get("no_targets") else t, bias=b if case.get("bias") else None,
        token_weights=tw if case.get("token_weights") else None, impl="torch", **opts, **dist_kw)
    total = (out * (up[1:] if case.get("shift") else up)).sum() \
        if case.get("reduction") == "none" else 1.3 * out
    total.backward()
    return out, [h.grad, w.grad, b.grad if case.get("bias") else None]


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _check(name, got, want, failures):
    try:
        torch.testing.assert_close(got, want, **TOL)
    except AssertionError as e:
        failures.append(f"{name}: {str(e).splitlines()[0:3]}")


def _compare(name, got, want, sl, failures):
    _check(f"{name} loss", got[0], want[0], failures)
    for gname, g, w, sliced in zip(("dh", "dw", "db"), got[1], want[1], (False, True, True)):
        if (g is None) != (w is None):
            failures.append(f"{name} {gname}: {'missing' if g is None else 'unexpected'}")
        elif g is not None:
            _check(f"{name} {gname}", g, w[sl] if sliced else w, failures)


def _vocab_cases(group):
    failures = []
    rank = dist.get_rank(group)
    for case in CASES:
        name = f"{case}"
        try:
            h, w, b, ids, lp, t, tw, up = _inputs(case)
            want = _call(case, h, _leaf(w), _leaf(b), ids, lp, t, tw, up)
            block = WORLD - 1 - rank if case.get("order") == "reversed" else rank
            start = sum(SIZES[:block])
            sl = slice(start, start + SIZES[block])
            kw = {"vocab_group": group}
            if case.get("order") == "reversed":
                kw["vocab_start"] = start
            if "reduce_hidden_grad" in case:
                kw["reduce_hidden_grad"] = case["reduce_hidden_grad"]
            got = _call(case, h, _leaf(w[sl]), _leaf(b[sl]), ids, lp, t, tw, up, **kw)
            if case.get("reduce_hidden_grad") is False:  # the caller's own reduction
                got[1][0] = got[1][0].clone()
                dist.all_reduce(got[1][0], group=group)
            _compare(name, got, want, sl, failures)
        except Exception:
            failures.append(f"{name}: {traceback.format_exc(limit=4)}")
    return failures



def _errors(group):
    """Calls that must raise on every rank alike (no rank left waiting in a collective)."""
    failures = []
    rank = dist.get_rank(group)
    h, w, b, ids, lp, t, tw, up = _inputs({})
    sl = slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))

    def call(hh=h, **kw):
        return cutce.linear_sparse_distillation_loss(hh, w[sl], ids, lp, t, vocab_group=group,
                                                     impl="torch", **kw)

    _raises("ranks disagree on tail", lambda: call(tail="drop" if rank == 0 else "bucket"),
            "ranks disagree on tail: rank 0 has 'drop', rank 1 has 'bucket'", failures)
    _raises("ranks disagree on K", lambda: cutce.linear_sparse_distillation_loss(
            h, w[sl], ids[:, :K - rank], lp[:, :K - rank], t, vocab_group=group, impl="torch"),
            "ranks disagree on teacher_ids K: rank 0 has 6, rank 1 has 5", failures)
    # no cross-entropy pass: the gather's own check of the hidden states
    _raises("hidden differs per rank", lambda: call(h + rank, tail="renormalize"),
            "same hidden states on every rank", failures)
    return failures


def _dtensor_case():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    failures = []
    mesh = init_device_mesh("cpu", (WORLD,))
    rank = dist.get_rank()
    case = {"tail": "bucket", "ce_weight": 0.3, "bias": True, "temperature": 1.4,
            "token_weights": True}
    h, w, b, ids, lp, t, tw, up = _inputs(case, seed=1)
    want = _call(case, h, _leaf(w), _leaf(b), ids, lp, t, tw, up)
    chunks = [len(c) for c in torch.arange(V).chunk(WORLD)]
    sl = slice(sum(chunks[:rank]), sum(chunks[:rank + 1]))
    try:
        parts = [distribute_tensor(x, mesh, [Shard(0)]).requires_grad_() for x in (w, b)]
        got = _call(case, h, parts[0], parts[1], ids, lp, t, tw, up)
        got[1][1:] = [p.grad.to_local() for p in parts]
        _compare("Shard(0) weight and bias", got, want, sl, failures)
    except Exception:
        failures.append(f"Shard(0): {traceback.format_exc(limit=4)}")
    return failures


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)  # the processes share 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    out = {}

    def section(name, fn):
        try:
            out[name] = fn()
        except Exception:
            out[name] = [traceback.format_exc(limit=4)]

    try:
        section("split", lambda: _vocab_cases(dist.group.WORLD))
        section("errors", lambda: _errors(dist.group.WORLD))
        section("dtensor", _dtensor_case)
    finally:
        finish_worker(rank, outdir, out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers(_worker, (WORLD,), WORLD, tmp_path_factory.mktemp("dist_sparse"), 180,
                       "distributed sparse distillation workers")


@pytest.mark.parametrize("section", ["split", "errors", "dtensor"])
def test_equals_single_process(results, section):
    failures = [f"rank {r}: {msg}" for r, res in enumerate(results) for msg in res[section]]
    assert not failures, "\n".join(failures[:20])
