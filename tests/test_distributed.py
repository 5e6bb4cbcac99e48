"""Vocabulary parallelism, DTensor and FSDP2 on CPU (gloo), against the single-process result.

One spawn of 3 processes serves every test: each worker runs all cases on the 3-rank world group
(uneven slices 9/17/11), on a 2-rank subgroup of global ranks [1, 2] (uneven 23/14; group ranks
differ from global ranks there), DTensor weights and FSDP2 training, and writes the failures it
collected to a JSON file; the tests read them. Float64 on the torch path, tolerance 1e-10.
Ranks whose calls disagree: tests/test_distributed_agreement.py.
"""

from __future__ import annotations

import datetime
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import cutce
from cutce import linear_cross_entropy
from dist_cases import CW, B, D, T, V, _inputs
from spawn import finish_worker, run_workers

WORLD = 3
SIZES = {"world3": [9, 17, 11], "world2": [23, 14]}
TOL = dict(rtol=1e-10, atol=1e-10)

# Each case is a set of call options; "targets" picks a target pattern, "bias"/"token_weights"
# switch those inputs on, "order" = "reversed" hands slices to ranks in reverse (vocab_start).
CASES = [
    {}, {"bias": True}, {"softcap": 3.0}, {"logit_scale": 0.7}, {"label_smoothing": 0.1},
    {"z_loss": 1e-2}, {"token_weights": True}, {"shift": True}, {"reduction": "sum"},
    {"reduction": "none"}, {"return_lse": True}, {"return_lse": True, "reduction": "none"},
    {"targets": "one_rank"}, {"targets": "one_rank", "reduction": "none", "label_smoothing": 0.3},
    {"targets": "all_ignored"}, {"targets": "all_ignored", "reduction": "sum", "z_loss": 0.1},
    {"ignore_index": 5}, {"reduce_hidden_grad": False, "bias": True}, {"order": "reversed"},
    {"order": "reversed", "bias": True, "label_smoothing": 0.2, "reduction": "none"},
    {"bias": True, "softcap": 2.0, "logit_scale": 1.3, "label_smoothing": 0.2, "z_loss": 1e-2,
     "token_weights": True, "shift": True, "return_lse": True},
    {"bias": True, "softcap": 2.0, "logit_scale": 1.3, "label_smoothing": 0.2, "z_loss": 1e-2,
     "token_weights": True, "shift": True, "return_lse": True, "reduction": "none"},
    # class weights: each rank passes its slice of them
    {"class_weight": True}, {"class_weight": True, "label_smoothing": 0.2, "reduction": "none"},
    {"class_weight": True, "label_smoothing": 0.1, "token_weights": True, "order": "reversed"},
]
def _run(h, w, b, t, tw, g_loss, g_lse, case, **dist_kw):
    """Call, backprop an arbitrary upstream gradient, return (loss, lse, dh, dw, db)."""
    opts = {k: v for k, v in case.items()
            if k not in ("bias", "token_weights", "targets", "order", "class_weight")}
    h = h.detach().clone().requires_grad_()
    out = linear_cross_entropy(h, w, t, b, token_weights=tw, impl="torch", **opts, **dist_kw)
    loss, lse = out if case.get("return_lse") else (out, None)
    sl = slice(1, None) if case.get("shift") else slice(None)
    total = (loss * g_loss[:, sl]).sum() if case.get("reduction") == "none" else loss
    if lse is not None:
        total = total + (lse * g_lse[:, sl]).sum()
    total.backward()
    return loss, lse, h.grad, w.grad, None if b is None else b.grad


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_()


def _check(name, got, want, failures):
    try:
        torch.testing.assert_close(got, want, **TOL)
    except AssertionError as e:
        failures.append(f"{name}: {str(e).splitlines()[0:3]}")


def _vocab_cases(group, sizes):
    """Every case on this group; returns failure strings."""
    failures = []
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    for case in CASES:
        name = f"{case}"
        try:
            h, w, b, t, tw, gl, gs = _inputs(case)
            full = {"class_weight": CW} if case.get("class_weight") else {}
            want = _run(h, _leaf(w), _leaf(b), t, tw, gl, gs, case, **full)
            block = world - 1 - rank if case.get("order") == "reversed" else rank
            start = sum(sizes[:block])
            sl = slice(start, start + sizes[block])
            kw = {"vocab_group": group}
            if case.get("order") == "reversed":
                kw["vocab_start"] = start
            if "reduce_hidden_grad" in case:
                kw["reduce_hidden_grad"] = case["reduce_hidden_grad"]
            if case.get("class_weight"):
                kw["class_weight"] = CW[sl]
            got = _run(h, _leaf(w[sl]), _leaf(None if b is None else b[sl]), t, tw, gl, gs,
                       {k: v for k, v in case.items() if k != "reduce_hidden_grad"}, **kw)
            dh = got[2]
            if case.get("reduce_hidden_grad") is False:  # the caller's own reduction
                dh = dh.clone()
                dist.all_reduce(dh, group=group)
            _check(f"{name} loss", got[0], want[0], failures)
            if case.get("return_lse"):
                _check(f"{name} lse", got[1], want[1], failures)
            _check(f"{name} dE", dh, want[2], failures)
            _check(f"{name} dC", got[3], want[3][sl], failures)
            if b is not None:
                _check(f"{name} dbias", got[4], want[4][sl], failures)
        except Exception:
            failures.append(f"{name}: {traceback.format_exc(limit=3)}")
    return (failures + _layout_errors(group, sizes) + _entropy_parts(group, sizes)
            + _per_token_temperature(group, sizes))


def _layout_errors(group, sizes):
    """A layout that does not tile [0, V), or hidden states that differ between ranks, raise on
    every rank alike (no rank left waiting in a collective)."""
    h, w, b, t, *_ = _inputs({})
    rank = dist.get_rank(group)
    sl = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    try:
        linear_cross_entropy(h, w[sl], t, vocab_group=group, vocab_start=0, impl="torch")
    except ValueError as e:
        if "tile [0, V)" not in str(e):
            return [f"overlap: wrong message {e}"]
    else:
        return ["overlapping vocab_start did not raise"]
    try:  # targets are checked against the global V (here 37), not the slice's size
        linear_cross_entropy(h, w[sl], torch.full_like(t, V), vocab_group=group, impl="torch")
    except ValueError as e:
        if f"class indices in [0, {V})" not in str(e):
            return [f"target range: wrong message {e}"]
    else:
        return ["target == V did not raise"]
    try:  # a data-parallel batch (different tokens per rank) is not a vocabulary split
        linear_cross_entropy(h + rank, w[sl], t, vocab_group=group, impl="torch")
    except ValueError as e:
        return [] if "same hidden states on every rank" in str(e) else [f"replicas: wrong message {e}"]
    return ["different hidden states per rank did not raise"]


def _entropy_parts(group, sizes):
    """combine_parts with entropy (for linear_log_probs) and temperature: all four parts and their
    gradients under arbitrary upstream gradients equal the unsplit backend's."""
    import cutce.parallel.vocab as cd
    from cutce.engine.options import Options
    from cutce.parallel.split import vocab_slice
    from cutce.backends.pytorch.ce import linear_lse_parts

    failures = []
    opts = Options(softcap=3.0, logit_scale=1.2, temperature=0.8, label_smoothing=0.1, need_entropy=True)
    h, w, b, t, *_ = _inputs({"bias": True}, seed=2)
    h2, t1 = h.reshape(-1, D), t.reshape(-1)
    ups = torch.randn(4, h2.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rank = dist.get_rank(group)
    sl = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    hf, wf, bf = _leaf(h2), _leaf(w), _leaf(b)
    full = linear_lse_parts(hf, wf, bf, t1, opts)
    sum((p * u).sum() for p, u in zip(full, ups)).backward()
    hs, ws, bs = _leaf(h2), _leaf(w[sl]), _leaf(b[sl])
    vs = vocab_slice(group, sizes[rank], None, h.device)
    split = cd.vocab_parallel_parts(linear_lse_parts, hs, ws, bs, t1, opts, vs)
    sum((p * u).sum() for p, u in zip(split, ups)).backward()
    for name, got, want in zip(("lse", "zt", "zsum", "pz"), split, full):
        _check(f"entropy parts {name}", got, want, failures)
    _check("entropy parts dE", hs.grad, hf.grad, failures)
    _check("entropy parts dC", ws.grad, wf.grad[sl], failures)
    _check("entropy parts dbias", bs.grad, bf.grad[sl], failures)
    return failures


def _per_token_temperature(group, sizes):
    """linear_log_probs with per-token temperatures (the same tensor on every rank), shifted,
    with the statistics: values and gradients equal the unsplit call's."""
    failures = []
    h, w, b, t, *_ = _inputs({"bias": True}, seed=3)
    g = torch.Generator().manual_seed(4)
    temp = torch.rand(B, T, generator=g, dtype=torch.float64) * 1.7 + 0.3
    up = torch.randn(2, B, T - 1, generator=g, dtype=torch.float64)
    rank = dist.get_rank(group)
    sl = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    kw = dict(temperature=temp, softcap=3.0, shift=True, return_stats=True, impl="torch")
    outs = []
    for weight, bias, extra in ((w, b, {}), (w[sl], b[sl], {"vocab_group": group})):
        hl, wl, bl = _leaf(h), _leaf(weight), _leaf(bias)
        st = cutce.linear_log_probs(hl, wl, t, bl, **kw, **extra)
        ((st.log_probs * up[0]).sum() + (st.entropy * up[1]).sum()).backward()
        outs.append((st, hl.grad, wl.grad, bl.grad))
    (want, dh, dw, db), (got, gh, gw, gb) = outs
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        _check(f"temperature tensor {name}", getattr(got, name), getattr(want, name), failures)
    if not torch.equal(got.is_top1, want.is_top1):
        failures.append("temperature tensor is_top1 differs")
    _check("temperature tensor dE", gh, dh, failures)
    _check("temperature tensor dC", gw, dw[sl], failures)
    _check("temperature tensor dbias", gb, db[sl], failures)
    return failures


def _comm_volume(group, sizes):
    """Forward communication: the layout (2 ints) and one all-gather of k x N floats (no weight,
    no logits)."""
    import cutce.parallel.collectives as cd
    from cutce.parallel import agreement, split

    h, w, b, t, *_ = _inputs({})
    rank = dist.get_rank(group)
    sl = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    seen, real = [], cd._all_gather_flat
    cd._all_gather_flat = lambda out, x, group=None: (seen.append(x.numel()), real(out, x, group=group))
    try:
        linear_cross_entropy(h, w[sl], t, vocab_group=group, impl="torch", label_smoothing=0.1)
    finally:
        cd._all_gather_flat = real
    # The layout's (start, size) and the call's fingerprint (a (kind, value) pair per field),
    # then (lse, zt, zsum, hidden fingerprint) per token.
    want = [split.LAYOUT_INTS + 2 * len(agreement.FIELDS), 4 * B * T]
    return [] if seen == want else [f"all-gathered elements per call {seen}, expected {want}"]


def _dtensor_cases():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    failures = []
    mesh1 = init_device_mesh("cpu", (WORLD,))
    mesh2 = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
    case = {"bias": True, "label_smoothing": 0.1, "z_loss": 1e-2, "return_lse": True, "softcap": 4.0}
    h, w, b, t, tw, gl, gs = _inputs(case, seed=1)
    want = _run(h, _leaf(w), _leaf(b), t, tw, gl, gs, case)
    layouts = {"Shard(0)": (mesh1, [Shard(0)]), "(Replicate, Shard(0))": (mesh2, [Replicate(), Shard(0)]),
               "Replicate": (mesh1, [Replicate()])}
    for name, (mesh, placements) in layouts.items():
        try:
            wd = distribute_tensor(w, mesh, placements).requires_grad_()
            bd = distribute_tensor(b, mesh, placements).requires_grad_()
            got = _run(h, wd, bd, t, tw, gl, gs, case)
            gw, gb = wd.grad.to_local(), bd.grad.to_local()
            # Where this rank's shard sits: the DTensor knows it (uneven chunks: 13/13/11).
            sizes = [0] * WORLD
            dist.all_gather_object(sizes, gw.shape[0])
            r = mesh.get_local_rank(len(placements) - 1)
            sl = slice(sum(sizes[:r]), sum(sizes[:r + 1])) if placements[-1] == Shard(0) else slice(None)
            _check(f"{name} loss", got[0], want[0], failures)
            _check(f"{name} lse", got[1], want[1], failures)
            _check(f"{name} dE", got[2], want[2], failures)
            _check(f"{name} dC", gw, want[3][sl], failures)
            _check(f"{name} dbias", gb, want[4][sl], failures)
        except Exception:
            failures.append(f"{name}: {traceback.format_exc(limit=3)}")
    try:  # replicated DTensor hidden states work too
        hd = distribute_tensor(h, mesh1, [Replicate()])
        wd = distribute_tensor(w, mesh1, [Shard(0)])
        _check("Replicate hidden", linear_cross_entropy(hd, wd, t, impl="torch"),
               linear_cross_entropy(h, w, t, impl="torch"), failures)
    except Exception:
        failures.append(f"Replicate hidden: {traceback.format_exc(limit=3)}")
    return failures


class _Tiny(torch.nn.Module):
    """Embedding + MLP + linear head whose loss is cutce's, computed inside forward (where FSDP2
    has unsharded the parameters)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.mlp = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, V, bias=False)

    def forward(self, ids):
        h = torch.tanh(self.mlp(self.emb(ids)))
        return linear_cross_entropy(h, self.head.weight, ids, shift=True, z_loss=1e-3, impl="torch")


def _fsdp2_case(rank, steps=4):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, V, (2 * WORLD, T), generator=g) for _ in range(steps)]
    torch.manual_seed(4)
    ref = _Tiny().double()
    model = _Tiny().double()
    model.load_state_dict(ref.state_dict())
    want = []
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for ids in batches:
        opt.zero_grad()
        loss = ref(ids)
        loss.backward()
        opt.step()
        want.append(loss.item())
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model.emb, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    got = []
    for ids in batches:  # each rank its 2 sequences; FSDP2 averages gradients over ranks
        opt.zero_grad()
        loss = model(ids[2 * rank:2 * rank + 2])
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        got.append(mean.item() / WORLD)
    failures = []
    _check("FSDP2 losses", torch.tensor(got), torch.tensor(want), failures)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        _check(f"FSDP2 param {n}", p.full_tensor(), q.detach(), failures)
    # Outside forward the head's weight is FSDP2's DTensor, sharded on dim 0 over the
    # data-parallel mesh: not a vocabulary split, since each rank has its own tokens. It must
    # raise, not return a wrong loss.
    h = torch.randn(2, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    try:
        linear_cross_entropy(h, model.head.weight, batches[0][2 * rank:2 * rank + 2], impl="torch")
        failures.append("FSDP2-sharded weight outside forward did not raise")
    except ValueError as e:
        if "same hidden states on every rank" not in str(e):
            failures.append(f"FSDP2-sharded weight outside forward: wrong message {e}")
    return failures


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)  # 3 processes share 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    out = {}

    def section(name, fn):
        t0 = time.perf_counter()
        try:
            out[name] = fn()
        except Exception:
            out[name] = [traceback.format_exc(limit=4)]
        out[name + "_s"] = time.perf_counter() - t0

    try:
        sub = dist.new_group([1, 2])  # every rank must call new_group
        section("world3", lambda: _vocab_cases(dist.group.WORLD, SIZES["world3"])
                + _comm_volume(dist.group.WORLD, SIZES["world3"]))
        section("world2", lambda: _vocab_cases(sub, SIZES["world2"]) if rank in (1, 2) else [])
        section("dtensor", _dtensor_cases)
        section("fsdp2", lambda: _fsdp2_case(rank))
    finally:
        finish_worker(rank, outdir, out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers(_worker, (WORLD,), WORLD, tmp_path_factory.mktemp("dist"), 240,
                       "distributed workers")


@pytest.mark.parametrize("section", ["world3", "world2", "dtensor", "fsdp2"])
def test_equals_single_process(results, section):
    failures = [f"rank {r}: {msg}" for r, res in enumerate(results) for msg in res[section]]
    assert not failures, "\n".join(failures[:20])


BAD_KEYWORDS = [
    (dict(vocab_group="world"), r"vocab_group: expected None or a torch.distributed.ProcessGroup, got str"),
    (dict(vocab_start=3), r"vocab_start: expected None unless vocab_group is given"),
    (dict(vocab_start=-1), r"vocab_start: expected None or an int >= 0, got -1"),
    (dict(reduce_hidden_grad=1), r"reduce_hidden_grad: expected a bool, got 1"),
]


@pytest.mark.parametrize("kw,msg", BAD_KEYWORDS)
def test_bad_keywords(kw, msg):
    h, w, _, t, *_ = _inputs({})
    with pytest.raises(ValueError, match=msg):
        linear_cross_entropy(h, w, t, **kw)


def test_module_form_accepts_distributed_keywords():
    loss = cutce.LinearCrossEntropyLoss(vocab_group=None, reduce_hidden_grad=True)
    h, w, _, t, *_ = _inputs({})
    torch.testing.assert_close(loss(h, w, t), linear_cross_entropy(h, w, t))
