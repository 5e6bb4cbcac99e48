"""Vocabulary-parallel cutce on K processes: equivalence to one device, then timing and memory.

    PYTHONPATH=src python benchmarks/multi_gpu.py --out bench-out       # every visible GPU
    PYTHONPATH=src python benchmarks/multi_gpu.py --gpus 2 --impl triton
    PYTHONPATH=src python benchmarks/multi_gpu.py --cpu-smoke           # world size 1 on CPU, seconds

Without torchrun's environment it starts itself under ``torch.distributed.run`` with one process
per GPU (NCCL) or per CPU process (--cpu: gloo; --cpu-smoke: one process, tiny shapes). NVLink
multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1): a program that uses it can take a host's shared GPUs down. Each rank holds a contiguous,
uneven slice of the classifier (the first ranks get one row more); hidden states and targets are
the same on every rank.

1. Equivalence, per dtype (bf16, fp32) and option case: loss, lse, dE, dC and dbias of
   ``linear_cross_entropy(..., vocab_group=WORLD)`` against the single-device call on the full
   weight (same impl), both also against a float64 oracle (impl="torch" on float64 copies).
   A case passes when |vp - single| <= max(floor, 2 * |single - oracle|) (relative norms).
2. Timing at the Gemma shape (N=8192 and 65536, D=2304, V=256000 over the ranks), bf16,
   forward + backward: median time as a ratio to the single-device call on the full vocabulary
   (run on every rank at once, each on its own device), peak memory per device, and the bytes
   one call hands to collectives (payload; a ring moves about (W-1)/W of an all-gather's output
   and 2(W-1)/W of an all-reduce's tensor per rank).
Rank 0 prints a table and writes multi_gpu_<device>_x<K>.json under --out ({"benchmark":
"multi_gpu", "meta", "rows"}: one row per check and per rank's timing); the exit status is 1 when
a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import statistics
import subprocess
import sys
import time

# Before torch (and NCCL) read them; a caller's explicit setting is kept.
for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import cutce.parallel.collectives as cd  # noqa: E402
from cutce import linear_cross_entropy  # noqa: E402
from cutce.bench import report as results_file  # noqa: E402

CASES = {
    "plain": {},
    "bias+softcap+ls+zloss+tw+shift": dict(bias=True, softcap=30.0, label_smoothing=0.1, z_loss=1e-4,
                                          token_weights=True, shift=True, return_lse=True),
    "same, reduction=none": dict(bias=True, softcap=30.0, label_smoothing=0.1, z_loss=1e-4,
                                 token_weights=True, shift=True, return_lse=True, reduction="none"),
    "logit_scale, sum": dict(logit_scale=0.5, reduction="sum"),
    "targets on rank 0 only": dict(targets="rank0"),
    "all ignored": dict(targets="ignored"),
    "reduce_hidden_grad=False": dict(reduce_hidden_grad=False, bias=True),
}
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 8e-3}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def split(v, world, rank):
    """Uneven contiguous slices: the first v % world ranks get one row more."""
    sizes = [v // world + (r < v % world) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank]), sizes


def make_inputs(case, n, d, v, device, first_rows, seed=0):
    """Float32 inputs identical on every rank (same seed, generated on CPU); first_rows: the size
    of rank 0's slice (for targets that only rank 0 owns)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) / d**0.25
    w = torch.randn(v, d, generator=g) / d**0.25
    b = torch.randn(v, generator=g) * 0.1 if case.get("bias") else None
    if case.get("targets") == "rank0":
        t = torch.randint(0, first_rows, (n,), generator=g)
    else:
        t = torch.randint(0, v, (n,), generator=g)
    t[::7] = -100
    if case.get("targets") == "ignored":
        t.fill_(-100)
    tw = torch.rand(n, generator=g) + 0.5 if case.get("token_weights") else None
    gl, gs = torch.randn(n, generator=g), torch.randn(n, generator=g)  # upstream grads ("none", lse)
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return [move(x) for x in (h, w, b, t, tw, gl, gs)]


def run_case(case, h, w, b, t, tw, gl, gs, dtype, impl, **dist_kw):
    """One call + backward of a fixed upstream gradient. Returns (loss, lse, dh, dw, db)."""
    opts = {k: v for k, v in case.items() if k not in ("bias", "token_weights", "targets", "reduce_hidden_grad")}
    leaf = lambda x: None if x is None else x.detach().to(dtype).requires_grad_()  # noqa: E731
    h, w, b = leaf(h), leaf(w), leaf(b)
    out = linear_cross_entropy(h.unsqueeze(0), w, t.unsqueeze(0), b, impl=impl,
                               token_weights=None if tw is None else tw.unsqueeze(0), **opts, **dist_kw)
    loss, lse = out if case.get("return_lse") else (out, None)
    sl = slice(1, None) if case.get("shift") else slice(None)
    total = (loss[0] * gl[sl]).sum() if case.get("reduction") == "none" else loss
    if lse is not None:
        total = total + (lse[0] * gs[sl]).sum()
    total.backward()
    return [None if x is None else x.detach().double().cpu() for x in (loss, lse, h.grad, w.grad,
                                                                          None if b is None else b.grad)]


def rel(a, b):
    scale = b.norm()
    return float((a - b).norm() / (scale if scale > 0 else 1.0))


def check(args, device, world, rank):
    """Every case, every dtype; returns table rows (name, dtype, part, vp-vs-single, single-vs-f64, ok)."""
    n, d, v = args.check_shape
    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for name, case in CASES.items():
            sl, sizes = split(v, world, rank)
            ins = make_inputs(case, n, d, v, device, sizes[0], seed=len(rows))
            h, w, b, t, tw, gl, gs = ins
            oracle = run_case(case, *ins, torch.float64, "torch")
            single = run_case(case, *ins, dtype, args.impl)
            kw = {"vocab_group": dist.group.WORLD}
            if "reduce_hidden_grad" in case:
                kw["reduce_hidden_grad"] = case["reduce_hidden_grad"]
            vp = run_case(case, h, w[sl], None if b is None else b[sl], t, tw, gl, gs, dtype, args.impl, **kw)
            if case.get("reduce_hidden_grad") is False:  # this rank holds its share of dE only
                dh = vp[2].to(device)
                dist.all_reduce(dh)
                vp[2] = dh.cpu()
            for i, part in enumerate(("loss", "lse", "dE", "dC", "dbias")):
                if oracle[i] is None:
                    continue
                pick = (lambda x: x) if part in ("loss", "lse", "dE") else (lambda x: x[sl])  # noqa: E731
                e_vp, e_single = rel(vp[i], pick(single[i])), rel(pick(single[i]), pick(oracle[i]))
                ok = e_vp <= max(FLOOR[dtype], 2 * e_single)
                rows.append((name, dname, part, e_vp, e_single, ok))
    return rows


@contextlib.contextmanager
def count_comm(log):
    """Record (op, payload bytes) of every collective cutce issues while inside."""
    gather, reduce_ = cd._all_gather_flat, dist.all_reduce

    def counted_gather(out, x, group=None):
        log.append(("all_gather", x.numel() * x.element_size(), out.numel() * out.element_size()))
        return gather(out, x, group=group)

    def counted_reduce(x, *a, **k):
        log.append(("all_reduce", x.numel() * x.element_size(), x.numel() * x.element_size()))
        return reduce_(x, *a, **k)

    cd._all_gather_flat, dist.all_reduce = counted_gather, counted_reduce
    try:
        yield log
    finally:
        cd._all_gather_flat, dist.all_reduce = gather, reduce_


def timed(fn, reps, device):
    """Median wall time (ms) of fn() after warm-up, synchronized."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def bench(args, device, world, rank, n):
    """Gemma-shape timing of one row: single-device full vocabulary vs this rank's slice."""
    _, d, v = args.bench_shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(n, d, generator=g) / d**0.25).to(device, dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    sl, sizes = split(v, world, rank)
    w_full = (torch.randn(v, d, generator=g) / d**0.25).to(device, dtype).requires_grad_()
    w_mine = w_full.detach()[sl].clone().requires_grad_()

    def step(w, **kw):
        h.grad = w.grad = None
        linear_cross_entropy(h, w, t, impl=args.impl, **kw).backward()

    mem = device.type == "cuda"
    out = {"N": n, "D": d, "V": v, "world": world, "rows_here": sizes[rank]}
    out["single_ms"] = timed(lambda: step(w_full), args.reps, device)
    del w_full  # the vocabulary-parallel run holds only its slice
    if mem:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    out["vp_ms"] = timed(lambda: step(w_mine, vocab_group=dist.group.WORLD), args.reps, device)
    if mem:
        out["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_extra_GiB"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    log = []
    with count_comm(log):
        step(w_mine, vocab_group=dist.group.WORLD)
    out["comm"] = log
    out["payload_bytes"] = sum(p for _, p, _ in log)
    out["ring_bytes_per_rank"] = sum(o * (world - 1) / world if op == "all_gather" else 2 * p * (world - 1) / world
                                     for op, p, o in log)
    out["ratio"] = out["vp_ms"] / out["single_ms"]
    return out


def init():
    """Process group from torchrun's environment, or a world of one without torchrun."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=None, help="processes to start (default: every GPU)")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU processes (small default shapes)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="one CPU process, tiny shapes, fp32 only: checks the logic in seconds")
    p.add_argument("--impl", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--check-shape", default=None, help="N,D,V of the equivalence checks")
    p.add_argument("--bench-shape", default=None, help="N,D,V of the timing (N: first of --ns)")
    p.add_argument("--ns", default=None, help="token counts to time, comma-separated")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="checks only, no timing")
    p.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.cpu, args.gpus, args.dtypes = True, 1, "fp32"
        args.check_shape = args.check_shape or "24,8,61"
        args.bench_shape = args.bench_shape or "64,16,512"
        args.reps = args.reps or 1
    return args


def launch(k, argv) -> int:
    """Start this file under torch.distributed.run with k processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}",
           os.path.abspath(__file__), *argv]
    return subprocess.run(cmd).returncode


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    k = args.gpus or (1 if args.cpu else max(torch.cuda.device_count(), 1))
    if "RANK" not in os.environ and k > 1:  # not yet under torchrun: start one process per rank
        sys.exit(launch(k, argv))
    rank, world, local = init()
    if args.cpu:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --cpu or --cpu-smoke")
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    args.dtypes = [x for x in args.dtypes.split(",") if x]
    gpu = device.type == "cuda"
    args.check_shape = tuple(int(x) for x in (args.check_shape or ("1024,256,4099" if gpu else "48,16,301")).split(","))
    args.bench_shape = tuple(int(x) for x in (args.bench_shape or ("8192,2304,256000" if gpu else "256,64,8192")).split(","))
    ns = [int(x) for x in (args.ns or ("8192,65536" if gpu else str(args.bench_shape[0]))).split(",")]
    args.reps = args.reps or (10 if gpu else 3)

    rows = check(args, device, world, rank)
    every = [None] * world
    dist.all_gather_object(every, rows)
    failed = [(r, row) for r, rs in enumerate(every) for row in rs if not row[-1]]
    meta = dict(results_file.run_metadata(device), world=world, backend=backend, impl=args.impl,
                checks=len(rows) * world, failed=len(failed))
    timings = []
    if not args.quick:
        for n in ns:
            per_rank = [None] * world
            dist.all_gather_object(per_rank, bench(args, device, world, rank, n))
            timings.append(per_rank)
    if rank == 0:
        report(meta, rows, failed, timings)
        out_rows = [dict(kind="check", rank=r, case=c, dtype=dt, part=part, vp_vs_single=e_vp,
                         single_vs_f64=e_single, ok=ok)
                    for r, rs in enumerate(every) for c, dt, part, e_vp, e_single, ok in rs]
        out_rows += [dict(kind="timing", rank=r, **b) for per_rank in timings for r, b in enumerate(per_rank)]
        path = os.path.join(args.out, f"multi_gpu_{device.type}_x{world}.json")
        print(f"wrote {results_file.write_json(path, 'multi_gpu', meta, out_rows)}")
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalization: with gloo (torch 2.13) it aborted about one run in 20 after
    # all work was done ("terminate called without an active exception"), failing a good run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)


def report(meta, rows0, failed, timings):
    print(f"{meta['device_name']} x{meta['world']} ({meta['backend']}), torch {meta['torch']}, "
          f"cutce {meta['cutce']} ({meta['commit']}), impl={meta['impl']}, {meta['date']}")
    print(f"\nequivalence (rank 0's rows; relative error norms)\n{'case':34} {'dtype':5} {'part':6} "
          f"{'vp-vs-single':>12} {'single-vs-f64':>13}  ok")
    for name, dname, part, e_vp, e_single, ok in rows0:
        print(f"{name:34} {dname:5} {part:6} {e_vp:12.2e} {e_single:13.2e}  {'yes' if ok else 'NO'}")
    print(f"\n{meta['checks']} checks on all ranks, {len(failed)} failed")
    for r, row in failed:
        print(f"  FAILED rank {r}: {row}")
    for per_rank in timings:
        b0 = per_rank[0]
        print(f"\nN={b0['N']} D={b0['D']} V={b0['V']} over {b0['world']} rank(s), forward+backward:")
        print(f"{'rank':>4} {'rows':>7} {'single ms':>10} {'vp ms':>8} {'ratio':>6} {'peak GiB':>9} "
              f"{'extra GiB':>9} {'payload B':>10} {'ring B/rank':>11}")
        for r, b in enumerate(per_rank):
            print(f"{r:4d} {b['rows_here']:7d} {b['single_ms']:10.2f} {b['vp_ms']:8.2f} {b['ratio']:6.3f} "
                  f"{b.get('peak_GiB', float('nan')):9.2f} {b.get('peak_extra_GiB', float('nan')):9.2f} "
                  f"{b['payload_bytes']:10d} {b['ring_bytes_per_rank']:11.0f}")
        print("  collectives of one call (op, payload bytes, output bytes):", b0["comm"])


if __name__ == "__main__":
    main()
