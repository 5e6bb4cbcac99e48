"""linear_log_probs with top_k / top_p / min_p and the classifier split by vocabulary (gloo, 3
ranks, uneven slices 9/17/11 of V = 37), against the single-process call: the same dropped
tokens, log-probs, entropies and gradients (each rank's slice of the weight's and bias's)."""

from __future__ import annotations

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist

import cutce
from spawn import expect_value_error, finish_worker, run_workers
from truncated_cases import make_case

WORLD, SIZES, V = 3, [9, 17, 11], 37


def _call(h, w, b, t, opts, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b) if x is not None]
    logp, ent = cutce.linear_log_probs(leaves[0], leaves[1], t,
                                       leaves[2] if b is not None else None,
                                       return_entropy=True, impl="torch", **opts, **kw)
    g = torch.Generator().manual_seed(3)
    up = torch.randn(logp.shape, generator=g, dtype=logp.dtype)
    total = (torch.where(torch.isinf(logp), 0.0, logp) * up).sum() + (ent * up.flip(-1)).sum()
    total.backward()
    return [logp, ent] + [x.grad for x in leaves]


def _cases(rank):
    failures = []
    start, stop = sum(SIZES[:rank]), sum(SIZES[:rank + 1])
    g = torch.Generator().manual_seed(11)  # the same draws on every rank
    draws = [(dtype, exact) for dtype in (torch.float64, torch.float32) for exact in (True, False)
             for _ in range(3)]
    fixed = [dict(top_k=12), dict(top_p=0.7), dict(min_p=0.05), dict(top_k=5, top_p=0.8, min_p=0.01)]
    for i, (dtype, exact) in enumerate(draws + [(torch.float64, True)] * len(fixed)):
        h, w, b, t, opts = make_case(g, 20, 6, V, dtype, bias=i % 2 == 0, exact=exact)
        if i >= len(draws):
            opts = {**opts, "top_k": None, "top_p": None, "min_p": None, **fixed[i - len(draws)]}
        name = f"case {i} {dtype} {opts}"
        try:
            want = _call(h, w, b, t, opts)
            got = _call(h, w[start:stop], None if b is None else b[start:stop], t, opts,
                        vocab_group=dist.group.WORLD)
            want[3] = want[3][start:stop]
            if b is not None:
                want[4] = want[4][start:stop]
            tol = 1e-10 if dtype == torch.float64 else 2e-5
            if not torch.equal(torch.isinf(got[0]), torch.isinf(want[0])):
                failures.append(f"{name}: dropped tokens differ")
                continue
            for what, a, r in zip(("logp", "entropy", "dh", "dw", "db"), got, want):
                fin = torch.isfinite(r)
                torch.testing.assert_close(a[fin], r[fin], rtol=tol, atol=tol, msg=f"{name} {what}")
        except Exception as e:  # report, so that every rank still finishes its collectives
            failures.append(f"{name}: {str(e)[:300]}")
    h, w, t = torch.randn(4, 6), torch.randn(V, 6)[start:stop], torch.zeros(4, dtype=torch.long)
    # The truncation is part of Options, so the call's agreement exchange names what differs.
    expect_value_error("settings differ", lambda: cutce.linear_log_probs(
        h, w, t, top_k=3 + rank, vocab_group=dist.group.WORLD),
        "vocab_group ranks disagree on top_k: rank 0 has 3, rank 1 has 4, rank 2 has 5", failures)
    expect_value_error("top_p differs", lambda: cutce.linear_log_probs(
        h, w, t, top_p=0.5 if rank else 0.9, vocab_group=dist.group.WORLD),
        "vocab_group ranks disagree on top_p: rank 0 has 0.9, ranks 1, 2 have 0.5", failures)
    return failures


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    out = {"failures": ["did not finish"]}
    try:
        out["failures"] = _cases(rank)
    except Exception:
        out["failures"] = [traceback.format_exc(limit=6)]
    finally:
        finish_worker(rank, outdir, out)


def test_vocab_parallel_equals_single_process(tmp_path):
    results = run_workers(_worker, (WORLD,), WORLD, tmp_path, 180, "truncated distributed workers")
    failures = [f"rank {r}: {msg}" for r, res in enumerate(results) for msg in res["failures"]]
    assert not failures, "\n".join(failures[:20])
