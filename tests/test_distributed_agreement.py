"""Vocabulary-parallel ranks whose calls disagree (options, grad mode, shapes, class weights):
one spawn of 2 gloo processes makes each such call, and every rank must raise the same
ValueError naming what differs, at once (never a gloo abort or a hang); then the group must
still be in step. The fingerprint itself: cutce/agreement.py.
"""

from __future__ import annotations

import datetime
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from cutce import linear_cross_entropy, linear_log_probs
from dist_cases import CW, B, D, T, V, _inputs
from spawn import finish_worker, run_workers

# Ranks that disagree: key -> (field named by the error, rank 0's value, rank 1's value,
# call(rank, group)). _split_call makes the ordinary split call (rank 0 holds classes [0, 20),
# rank 1 the rest); the tensors are the same on both ranks unless the case changes them.
_H, _W, _, _T, _TW, *_ = _inputs({"token_weights": True})


def _split_call(rank, group, kw=None, h=_H, w=_W, t=_T, fn=linear_cross_entropy, **more):
    sl = slice(0, 20) if rank == 0 else slice(20, V)
    return fn(h, w[sl], t, vocab_group=group, impl="torch", **(kw or {}), **more)


def _on0(rank, mine, others):
    return mine if rank == 0 else others


def _grad_mode_call(rank, group):
    with torch.set_grad_enabled(rank != 0):
        return _split_call(rank, group)


def _autocast_call(rank, group):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=rank == 0):
        return _split_call(rank, group, h=_H.float(), w=_W.float())


def _dtensor_call(rank, group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    wd = distribute_tensor(_W, init_device_mesh("cpu", (2,)), [Shard(0)])
    return linear_cross_entropy(_H, wd, _T, impl="torch", label_smoothing=_on0(rank, 0.1, 0.0))


def _kw_case(name, v0, v1, key=None, fn=linear_cross_entropy):
    return (name, v0, v1, lambda r, g: _split_call(r, g, {key or name: _on0(r, v0, v1)}, fn=fn))

DISAGREE = {
    "label_smoothing": _kw_case("label_smoothing", 0.1, 0.0),
    "reduction": _kw_case("reduction", "sum", "mean"),
    "shift": _kw_case("shift", True, False),
    "reduce_hidden_grad": _kw_case("reduce_hidden_grad", False, True),
    "z_loss": _kw_case("z_loss", 1e-2, 0.0),
    "softcap": _kw_case("softcap", 3.0, None),
    "logit_scale": _kw_case("logit_scale", 2.0, 1.0),
    "ignore_index": _kw_case("ignore_index", 5, -100),
    "return_lse": _kw_case("return_lse", True, False),
    "filter_eps": _kw_case("filter_eps", 0.5, None),
    "chunk_bytes": _kw_case("chunk_bytes", 1024, None),
    "temperature": _kw_case("temperature", 0.5, 1.0, fn=linear_log_probs),
    "need_entropy": _kw_case("need_entropy", True, False, key="return_entropy", fn=linear_log_probs),
    # rank 0 takes the truncated path, rank 1 the untruncated one: the same first exchange
    "top_p": _kw_case("top_p", 0.9, None, fn=linear_log_probs),
    "min_p": _kw_case("min_p", 0.1, 0.2, fn=linear_log_probs),
    "token_weights": ("token_weights given", True, False,
                      lambda r, g: _split_call(r, g, token_weights=_on0(r, _TW, None))),
    "temperature tensor": ("temperature tensor given", True, False,
                           lambda r, g: _split_call(r, g, fn=linear_log_probs,
                                                    temperature=_on0(r, _TW.clone(), 1.0))),
    "class_weight": ("class_weight given", True, False,
                     lambda r, g: _split_call(r, g, class_weight=_on0(r, CW[:20], None))),
    "grad mode": ("grad mode (torch.is_grad_enabled())", False, True, _grad_mode_call),
    "requires_grad": ("hidden.requires_grad", True, False,
                      lambda r, g: _split_call(r, g, h=_H.clone().requires_grad_(r == 0))),
    "dtype": ("hidden dtype", "float32", "float64",
              lambda r, g: _split_call(r, g, h=_on0(r, _H.float(), _H), w=_on0(r, _W.float(), _W))),
    "autocast": ("torch.autocast", "bfloat16", None, _autocast_call),
    "tokens": ("tokens (hidden rows after shift)", T, B * T,
               lambda r, g: _split_call(r, g, h=_on0(r, _H[:1], _H), t=_on0(r, _T[:1], _T))),
    "D": ("hidden size D", 4, D,
          lambda r, g: _split_call(r, g, h=_on0(r, _H[..., :4], _H), w=_on0(r, _W[:, :4], _W))),
    "DTensor": ("label_smoothing", 0.1, 0.0, _dtensor_call),
}


def _disagree_worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting must fail the test, not hang it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=20))
    out = {}
    try:
        for key, (*_, call) in DISAGREE.items():
            t0 = time.perf_counter()
            try:
                call(rank, dist.group.WORLD)
                out[key] = ["no error", "", time.perf_counter() - t0]
            except Exception as e:
                out[key] = [type(e).__name__, str(e), time.perf_counter() - t0]
        # The group is still in step: a matching call after all those returns the unsplit loss.
        try:
            got = _split_call(rank, dist.group.WORLD, label_smoothing=0.1)
            want = linear_cross_entropy(_H, _W, _T, label_smoothing=0.1, impl="torch")
            out["after"] = abs(got.item() - want.item()) < 1e-10
        except Exception:
            out["after"] = traceback.format_exc(limit=3)
    finally:
        finish_worker(rank, outdir, out)


@pytest.fixture(scope="module")
def disagreements(tmp_path_factory):
    return run_workers(_disagree_worker, (2,), 2, tmp_path_factory.mktemp("disagree"), 90,
                       "workers whose options disagree")


@pytest.mark.parametrize("key", list(DISAGREE))
def test_ranks_that_disagree_raise_alike(disagreements, key):
    field, v0, v1, _ = DISAGREE[key]
    (kind0, msg0, s0), (kind1, msg1, s1) = disagreements[0][key], disagreements[1][key]
    assert kind0 == kind1 == "ValueError", (msg0, msg1)
    assert msg0 == msg1
    want = f"vocab_group ranks disagree on {field}: rank 0 has {v0!r}, rank 1 has {v1!r}"
    assert msg0.startswith(want), msg0
    assert max(s0, s1) < 10, f"took {max(s0, s1):.1f} s"  # at once, not after a timeout


def test_group_in_step_after_disagreements(disagreements):
    assert disagreements[0]["after"] is True and disagreements[1]["after"] is True, disagreements


def test_disagreement_message_groups_ranks():
    from cutce.parallel import agreement
    from cutce.engine.options import Options

    codes = [agreement.call_codes(Options(label_smoothing=ls), False, False, True, _H, None)
             for ls in (0.1, 0.0, 0.0, 0.1, 0.2)]
    with pytest.raises(ValueError, match=r"^vocab_group ranks disagree on label_smoothing: ranks 0, 3 "
                       r"have 0\.1, ranks 1, 2 have 0\.0, rank 4 has 0\.2 \("):
        agreement.check(codes)
    agreement.check(codes[1:3])  # agreeing ranks: no error
    # -0.0 is the same option as 0.0
    negative_zero = agreement.call_codes(Options(label_smoothing=-0.0), False, False, True, _H, None)
    agreement.check([codes[1], negative_zero])
