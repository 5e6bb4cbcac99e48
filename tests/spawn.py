"""Multi-process tests on gloo: start ``nprocs`` workers, wait with a deadline, read their JSON.

Each worker gets ``(rank, *args, port, outdir)`` and writes ``outdir/rank{r}.json``; a worker that
hangs (a collective mismatch under NCCL-like semantics) or dies fails the test instead of
hanging CI.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker, args, nprocs, outdir, seconds, what):
    """Run ``worker(rank, *args, port, outdir)`` on ``nprocs`` spawned processes; return the
    per-rank JSON results, or fail the test (with ``what`` in the message) on a hang or a death."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.start_processes(worker, args=(*args, free_port(), str(outdir)), nprocs=nprocs,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + seconds
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish in {seconds} s")
    except ProcessException as e:  # e.g. a gloo abort on a collective mismatch
        pytest.fail(f"{what}: a worker died: {e}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = []
    for r in range(nprocs):
        with open(os.path.join(str(outdir), f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


def finish_worker(rank, outdir, payload):
    """A worker's last step: write its JSON, leave the group, and exit at once, skipping the
    interpreter's finalization, where gloo (torch 2.13) now and then aborts a process whose work
    is done ("terminate called without an active exception")."""
    with open(os.path.join(str(outdir), f"rank{rank}.json"), "w") as f:
        json.dump(payload, f)
    dist.destroy_process_group()
    os._exit(0)


def expect_value_error(name, fn, needle, failures):
    """In a worker: ``fn()`` must raise ValueError saying ``needle``; anything else is recorded in
    ``failures`` (a worker reports failures instead of raising, so every rank still finishes)."""
    try:
        fn()
    except ValueError as e:
        if needle not in str(e):
            failures.append(f"{name}: wrong message {e}")
    except Exception:
        failures.append(f"{name}: {traceback.format_exc(limit=4)}")
    else:
        failures.append(f"{name} did not raise")
