"""Timing, peak memory and error measurement of one provider on one set of inputs.

Protocol, the same for every provider:

- forward: the loss only, under ``torch.no_grad()``;
- forward+backward: the loss, then ``loss.backward()`` into fresh gradients of hidden and weight
  (``.grad`` is reset before every call, so allocating the gradients is part of the work, as in a
  training step);
- each is called ``warmup`` times (compilation, autotuning, allocator warm-up; the first call's
  results give the errors) and then timed ``repeats`` times; the median is reported. CUDA events
  time the GPU, ``time.perf_counter`` the CPU;
- peak memory, so that the inputs do not count and the gradients do: on CUDA a separate, untimed
  call, the allocator's peak during it minus what was allocated before it (``"cuda-allocator"``);
  on CPU, where PyTorch keeps no allocator statistics, each provider runs in its own process
  (:func:`measure_in_subprocess`) and the memory is that process's peak resident set size during
  the first call of each phase minus its size once the inputs are loaded (``"rss-subprocess"``,
  Linux only). RSS also counts memory the C allocator keeps cached, so it is an upper bound on
  what the provider needs, and it is read right after that call, before the errors are computed.

Errors are ``||x - ref|| / ||ref||`` against a reference computed once per input set: float64 on
CPU, and on GPU float32 from cutce's exact torch path on upcast inputs (float64 GEMMs are too slow
there, and float32 is far below bf16/fp16 rounding).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

import cutce


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    """Drop garbage and, on CUDA, cached blocks: after an OOM, the next provider starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(call, device, setup=None) -> float:
    """Milliseconds one ``call()`` takes (``setup()`` runs before, untimed)."""
    if setup is not None:
        setup()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1e3


def median_ms(call, device, warmup: int, repeats: int, setup=None) -> float:
    for _ in range(warmup):
        if setup is not None:
            setup()
        call()
    _sync(device)
    return statistics.median(time_ms(call, device, setup) for _ in range(max(1, repeats)))


def peak_extra_mb(call, device, setup=None) -> float | None:
    """Peak allocated MiB during ``call()`` above what was allocated before it; None off CUDA
    (the CPU allocator keeps no such statistics: see :class:`RssPeak`)."""
    if device.type != "cuda":
        return None
    if setup is not None:
        setup()
    gc.collect()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_head(fn, hidden, weight, rest, ref, device, warmup: int, repeats: int,
                 row: dict) -> None:
    """One provider's row of a head benchmark whose step is ``fn(hidden, weight, *rest)`` (a
    scalar loss) and its backward into fresh dE and dC: fills ``row``'s loss_err, dE_err,
    dC_err (against ``ref``, the same three), ms (median of ``repeats`` after ``warmup``) and
    peak_mib (CUDA only). The first call also compiles."""
    def step():
        a, c = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = fn(a, c, *rest)
        return (loss.detach(), *torch.autograd.grad(loss, (a, c)))

    out = step()
    row["loss_err"], row["dE_err"], row["dC_err"] = (rel_err(x, r) for x, r in zip(out, ref))
    del out
    row["ms"] = median_ms(step, device, warmup, repeats)
    row["peak_mib"] = peak_extra_mb(step, device)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


class RssPeak:
    """Peak resident set size of this process above a base, from Linux's VmHWM, whose high-water
    mark ``reset()`` brings down to the current size (``/proc/self/clear_refs``).

    Not ``resource.getrusage().ru_maxrss``: a process started by a large one reports its
    parent's peak there (the kernel carries it across exec), which would hide the child's own.
    """

    def __init__(self):
        self.reset()
        self.base_kb = _status_kb("VmRSS")

    @staticmethod
    def reset():
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (Linux >= 4.0)

    def peak_mb(self) -> float:
        return max(0, _status_kb("VmHWM") - self.base_kb) / 1024

    @staticmethod
    def available() -> bool:
        try:
            RssPeak()
            return True
        except (OSError, ValueError):
            return False


def rel_err(x, ref, rows: int = 1 << 14) -> float:
    """||x - ref|| / ||ref|| in ref's dtype, over blocks of rows so that comparing a (V, D)
    gradient never needs a second full-size temporary. NaN when x is missing."""
    if x is None:
        return math.nan
    ref = ref.reshape(ref.shape[0], -1) if ref.dim() else ref.reshape(1, 1)
    x = x.detach().reshape(ref.shape)
    num = den = 0.0
    for s in range(0, ref.shape[0], rows):
        r = ref[s:s + rows]
        num += (x[s:s + rows].to(r.dtype) - r).square().sum().item()
        den += r.square().sum().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


@dataclass
class Reference:
    """The reference loss and gradients of one input set, and what they were computed with."""

    loss: torch.Tensor
    d_hidden: torch.Tensor
    d_weight: torch.Tensor
    label: str


def reference(hidden, weight, targets) -> Reference:
    """Float64 (CPU) or float32 (CUDA) exact loss and gradients from cutce's chunked torch path."""
    on_cuda = hidden.device.type == "cuda"
    dtype = torch.float32 if on_cuda else torch.float64
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    # On the GPU a larger chunk than the default keeps the reference's GEMMs efficient; the
    # reference runs once per input set and its memory is not measured.
    chunk = 2**30 if on_cuda else None
    loss = cutce.linear_cross_entropy(h, w, targets, impl="torch", chunk_bytes=chunk)
    loss.backward()
    label = "float32 cutce-torch (upcast inputs)" if on_cuda else "float64 cutce-torch"
    return Reference(loss.detach(), h.grad, w.grad, label)


@dataclass
class Result:
    """What :func:`measure` found for one provider; None where not measured."""

    fwd_ms: float | None = None
    fwd_mb: float | None = None
    fwdbwd_ms: float | None = None
    peak_mb: float | None = None
    loss_err: float | None = None
    de_err: float | None = None
    dc_err: float | None = None
    errors: list = field(default_factory=list)

    @property
    def status(self) -> str:
        return "error" if self.errors else "ok"


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text[:300]


def measure(fn, hidden, weight, targets, ref: Reference, *, warmup: int = 1, repeats: int = 3,
            mode: str = "both", rss: RssPeak | None = None) -> Result:
    """Time, memory and errors of ``fn(hidden, weight, targets) -> loss``.

    With ``rss`` (a probe made once the inputs are loaded) the memory is the RSS peak of each
    phase's first call; otherwise the CUDA allocator's (None off CUDA).

    An exception in one phase (forward, or forward+backward) is recorded in ``Result.errors``
    and the other phase still runs; the caller keeps going with the next provider.
    """
    device = hidden.device
    res = Result()
    warmup = max(1, warmup)  # the first call gives the errors and absorbs compilation
    h0, w0 = hidden.detach(), weight.detach()

    if mode in ("both", "fwd"):
        try:
            with torch.no_grad():
                if rss is not None:
                    rss.reset()
                loss = fn(h0, w0, targets)
                if rss is not None:
                    res.fwd_mb = rss.peak_mb()
                res.loss_err = rel_err(loss.float(), ref.loss)
                del loss
                res.fwd_ms = median_ms(lambda: fn(h0, w0, targets), device, warmup - 1, repeats)
                if rss is None:
                    res.fwd_mb = peak_extra_mb(lambda: fn(h0, w0, targets), device)
        except Exception as exc:  # OOM, unsupported dtype, a peer's bug: report, go on
            res.errors.append(f"fwd: {_describe(exc)}")
        free_memory(device)

    if mode in ("both", "fwd-bwd"):
        # detach() shares storage: the leaves cost no memory beyond the inputs.
        h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()

        def reset():
            h.grad = w.grad = None

        def step():
            fn(h, w, targets).backward()

        try:
            reset()
            if rss is not None:
                rss.reset()
            loss = fn(h, w, targets)
            loss.backward()
            if rss is not None:
                res.peak_mb = rss.peak_mb()  # before the errors' temporaries
            if res.loss_err is None:
                res.loss_err = rel_err(loss.detach().float(), ref.loss)
            res.de_err, res.dc_err = rel_err(h.grad, ref.d_hidden), rel_err(w.grad, ref.d_weight)
            del loss
            reset()
            res.fwdbwd_ms = median_ms(step, device, warmup - 1, repeats, setup=reset)
            if rss is None:
                res.peak_mb = peak_extra_mb(step, device, setup=reset)
        except Exception as exc:
            res.errors.append(f"fwd+bwd: {_describe(exc)}")
        reset()
        free_memory(device)
    return res


def matmul_ms(hidden, weight, dtype, *, warmup: int = 1, repeats: int = 3) -> float:
    """Median time of one ``hidden @ weight.T`` in ``dtype``: the unit every time is divided by."""
    a, b = hidden.detach().to(dtype), weight.detach().to(dtype)
    ms = median_ms(lambda: a @ b.T, hidden.device, max(1, warmup), repeats)
    del a, b
    free_memory(hidden.device)
    return ms


# --- one provider in its own process (CPU memory) ----------------------------------------------

def save_inputs(path, hidden, weight, targets, ref: Reference) -> None:
    """The inputs and the reference, for :func:`measure_in_subprocess` (written once per shape)."""
    torch.save(dict(hidden=hidden.detach(), weight=weight.detach(), targets=targets, loss=ref.loss,
                    d_hidden=ref.d_hidden, d_weight=ref.d_weight, label=ref.label), path)


def measure_in_subprocess(provider: str, inputs_path, *, warmup: int = 1, repeats: int = 3,
                          mode: str = "both") -> Result:
    """:func:`measure` of a named provider in a fresh Python process on the inputs saved by
    :func:`save_inputs`, with its memory as RSS growth (:class:`RssPeak`). A child that dies
    (e.g. killed for memory) gives a Result with the error."""
    import cutce as _cutce

    src = os.path.dirname(os.path.dirname(os.path.abspath(_cutce.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="cutce-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        spec = dict(provider=provider, inputs=str(inputs_path), out=out, warmup=warmup,
                    repeats=repeats, mode=mode, threads=torch.get_num_threads())
        code = "import sys, cutce.bench.measure as m; m._child_main(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            last = (proc.stderr.strip().splitlines() or [""])[-1]
            return Result(errors=[f"subprocess exited with {proc.returncode}: {last}"[:300]])
        with open(out) as f:
            return Result(**json.load(f))


def _child_main(spec_json: str) -> None:
    from .providers import PROVIDERS

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    blob = torch.load(spec["inputs"], weights_only=True)
    ref = Reference(blob["loss"], blob["d_hidden"], blob["d_weight"], blob["label"])
    hidden, weight, targets = blob["hidden"], blob["weight"], blob["targets"]
    del blob
    try:
        fn = PROVIDERS[spec["provider"]].build(hidden.device)
    except Exception as exc:  # a peer that imports but cannot set up: a row, not a crash
        res = Result(errors=[f"setup: {_describe(exc)}"])
    else:
        # One call on a few tokens first: lazy imports and one-time set-up (libraries, thread
        # pools, registrations) then land below the memory base instead of in the first phase.
        try:
            k = min(8, hidden.shape[0])
            fn(hidden[:k].detach().requires_grad_(), weight.detach().requires_grad_(), targets[:k]).backward()
        except Exception:
            pass  # measure() below reports it
        res = measure(fn, hidden, weight, targets, ref, warmup=spec["warmup"], repeats=spec["repeats"],
                      mode=spec["mode"], rss=RssPeak())
    with open(spec["out"], "w") as f:
        json.dump(dataclasses.asdict(res), f)
