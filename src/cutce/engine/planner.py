"""The one place that decides how a head computation runs: backend, strategy, chunks.

Every public function describes its call as a :class:`~cutce.engine.problem.Problem`; the api
asks :func:`choose_backend` and :func:`settle` once and hands the :class:`Plan` to the backend,
which runs it (its chunk sizes come from :mod:`cutce.engine.chunks`). Under torch.compile the
api plans nothing: the number of tokens is symbolic while tracing, and the backends' custom ops,
which run with real shapes, plan once each at run time (:func:`plan_in_op`), so the graph never
specializes on N. Nothing else decides a strategy or a chunk.

Three exact strategies (the first two for the loss and the distillation alike):

- **recompute**: the forward keeps O(N) values, the backward recomputes the logit tiles. It
  serves any upstream gradient (reduction "none", a returned lse, log-probs, entropy). Loss:
  four N x D x V products, extra memory <= ~10% of the gradients at ``memory_budget=0``; within
  a budget that covers it, its backward sums dC in a float32 V x D buffer when it splits the
  tokens (:func:`recompute_dc_f32`) and spends the rest on fewer, larger chunks
  (:func:`recompute_spare_bytes`).
- **fused**: for a call whose upstream gradient is known up to one scalar
  (``Problem.reduced``), each chunk of tokens is finished in the forward: its logits computed
  once (the teacher's too), the logit gradient formed right away, dE and dC produced from it.
  Loss: three products instead of four; distillation (frozen teacher, beta < 1): 8 student-sized
  products instead of 12 (forward KL), 9 instead of 17 (JSD). The backward only scales them.
- **keep**: for a call with per-token outputs (not ``reduced``: log-probs, entropy, reduction
  "none", a returned lse) on the Triton path, when the budget holds every logit: the forward
  stores them (N x V in the inputs' dtype, held until the backward), the backward turns them
  into the logit gradient in place. Three products instead of four, at the rounding of a 16-bit
  logit gradient as in the other strategies. All tokens or none: a call whose logits do not fit
  recomputes (no partial keep), so the default budget keeps the recompute strategy's memory at
  large N x V. A second backward through the same outputs recomputes.

``memory_budget`` (a user option, the same for every function): the extra memory a call may use
beyond its gradients, as a fraction of its inputs' size (hidden states and classifier weights of
every head, :meth:`Problem.input_bytes`; for a loss that trains both, the gradients' size). The
plan takes the fused strategy with the fewest, largest chunks that fit, else recompute; 0 always
recomputes. Defaults: 2.0 on the Triton path (the float32 dC accumulator alone is ~2x dC's 16-bit
bytes, so less would leave only the recompute strategy at large vocabularies); 1.0 on the torch
path, whose CPU GEMMs are as fast with 256 rows as with 512 (N=4096, D=512, V=65536, float32:
6.3 s at +287 MB vs 6.7-7.3 s at +406 MB).

Fused memory, beyond the gradients (16-bit inputs on the GPU): the chunk's logit gradient
(chunk x V; in dC's own bytes while it fits there, dC being written only at the end), with more
than one chunk a float32 dC accumulator (V x D x 4 bytes, so dC is never rounded between
chunks), small per-chunk temporaries; distillation adds the tile-max tables and, optionally, the
student's own exponentials (``student_x``). On the torch path the float32 dC is the gradient's
own accumulator and a chunk holds a few float32 chunk x V temporaries.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import chunks
from .chunks import (MAX_DISTILL_CHUNK, MAX_FUSED_CHUNK, MIN_DISTILL_CHUNK,  # noqa: F401
                     MIN_FUSED_CHUNK, RECOMPUTE_CHUNK, distill_extra_bytes, fused_extra_bytes,
                     kept_bytes, kept_width, v_pad)
from .problem import Problem, elt

DEFAULT_MEMORY_BUDGET = {"triton": 2.0, "torch": 1.0}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a backend needs to run a call, decided once.

    strategy: "recompute" | "fused" | "keep".
    chunk_n: tokens per chunk: the fused strategy's; the recompute backward's (Triton) where the
        budget holds :data:`~cutce.engine.chunks.RECOMPUTE_CHUNK` (0: its chunks are sized at run
        time within ``workspace``, by :func:`cutce.engine.chunks.recompute_chunks`, because a
        filtered backward learns only then how many classes it visits).
    chunk_v: classes per chunk of the recompute backward where ``chunk_n`` is set (else 0).
    workspace: bytes the recompute backward may spend on its chunks beyond the gradients.
    dc_in_place: the fused chunk's logit gradient lives in dC's bytes.
    dc_f32: dC is summed in a float32 accumulator over token chunks (fused: more than one chunk,
        16-bit weight; recompute: allowed by the budget, used when the tokens are split).
    student_x: the fused distillation also stores the student's exponentials (elementwise dz
        passes).
    """

    strategy: str
    chunk_n: int = 0
    chunk_v: int = 0
    workspace: int = 0
    dc_in_place: bool = False
    dc_f32: bool = False
    student_x: bool = False

    @property
    def fused(self) -> bool:
        return self.strategy == "fused"

    def encode(self) -> list[int]:
        """The plan as the integers a custom op's ``int[]`` argument carries (see :func:`decode`)."""
        return [_STRATEGIES.index(self.strategy), self.chunk_n, self.chunk_v, self.workspace,
                int(self.dc_in_place), int(self.dc_f32), int(self.student_x)]


_STRATEGIES = ("recompute", "fused", "keep")


def decode(code) -> Plan | None:
    """The plan a backend op received from :meth:`Plan.encode`, or None for an empty code: the
    api planned nothing because the call is traced by torch.compile (see :func:`plan_in_op`)."""
    if not code:
        return None
    s, cn, cv, ws, in_place, f32, sx = code
    return Plan(_STRATEGIES[s], cn, cv, ws, bool(in_place), bool(f32), bool(sx))


RECOMPUTE = Plan("recompute")
KEEP = Plan("keep")


def budget_bytes(p: Problem, backend: str) -> float:
    b = DEFAULT_MEMORY_BUDGET[backend] if p.memory_budget is None else p.memory_budget
    return b * p.input_bytes()


# ---- which backend ---------------------------------------------------------------------------

def choose_backend(impl: str, is_cuda: bool, triton_reason) -> tuple[str, str | None]:
    """("torch" | "triton", why Triton was passed over on CUDA or None). ``triton_reason()``
    says why the Triton backend cannot run the call (None if it can); it is asked only when
    Triton is a candidate. "auto" never takes Triton for CPU tensors; an explicit "triton" that
    cannot run raises (never a silent fallback)."""
    if impl == "torch" or (impl == "auto" and not is_cuda):
        return "torch", None
    reason = triton_reason()
    if reason is None:
        return "triton", None
    if impl == "triton":
        raise RuntimeError(f"impl='triton' cannot run: {reason}")
    return "torch", reason


def may_fuse(p: Problem, backend: str) -> bool:
    """Whether a call may take the fused strategy at all, from static facts only (never N, so
    that torch.compile does not specialize on it): a reduced call that needs a gradient, a
    budget that is not 0; the Triton loss kernel covers neither label smoothing nor float16;
    a distillation fuses only with a frozen teacher and beta < 1 on the Triton path (the reverse
    KL's gradient needs log p beyond a 16-bit exponential's range)."""
    if not p.reduced or p.memory_budget == 0 or not (p.need_h or p.need_w):
        return False
    if backend == "torch":
        return True
    if p.distill:
        return not p.teacher_grad and p.beta != 1.0
    return not p.smoothing and p.dtype in (torch.bfloat16, torch.float32)


# ---- which strategy and chunk ----------------------------------------------------------------

def plan(p: Problem, backend: str, *, student_x: bool = False, chunk: int | None = None) -> Plan:
    """The strategy and chunk of a call that :func:`may_fuse` (or of any call: recompute when it
    may not). ``student_x``: a fused distillation may store the student's exponentials too (it
    does when a chunk fits with them); ``chunk``: a forced distillation chunk (experiments)."""
    if p.n == 0:
        return RECOMPUTE
    if may_keep(p, backend) and kept_bytes(p) <= budget_bytes(p, backend):
        # with the recompute plan's numbers: a second backward through the same outputs, or a
        # forward whose kept logits did not fit after all, recomputes
        return dataclasses.replace(recompute_plan(p, backend), strategy="keep")
    pl = None
    if may_fuse(p, backend):
        pl = _plan_distill(p, backend, student_x, chunk) if p.distill else _plan_loss(p, backend)
    return pl if pl is not None else recompute_plan(p, backend)


def recompute_plan(p: Problem, backend: str) -> Plan:
    """The recompute strategy's plan. Triton: the backward's workspace (the budget's spare bytes
    or :func:`~cutce.engine.chunks.workspace_floor`, whichever is more), its chunk where the budget
    holds :data:`RECOMPUTE_CHUNK` (unfiltered calls), and whether dC may be summed in float32.
    The torch path's chunks follow its temporaries' size (``chunk_bytes``)."""
    if backend == "torch" or p.n == 0 or p.distill:
        return RECOMPUTE
    spare = recompute_spare_bytes(p)
    work = max(spare, chunks.workspace_floor(p.n, p.v, p.d, p.dtype))
    dc_f32 = recompute_dc_f32(p)
    # (a filtered backward that visits most classes goes dense, and takes this chunk too)
    if spare >= recompute_chunk_bytes(p):
        return Plan("recompute", chunk_n=min(p.n, RECOMPUTE_CHUNK[0]), chunk_v=RECOMPUTE_CHUNK[1],
                    workspace=work, dc_f32=dc_f32)
    return Plan("recompute", workspace=work, dc_f32=dc_f32)


def plan_in_op(backend: str, n: int, v: int, d: int, dtype: torch.dtype, need_h: bool,
               need_w: bool, memory_budget, *, recompute: bool = False, **facts) -> Plan:
    """The plan of a call that torch.compile traced: the api planned nothing then (the number of
    tokens is symbolic while tracing, and a plan read off it would specialize the graph on N),
    so the backend's custom op, which runs with real shapes, asks here with its own N and the
    call's static facts (the ones :class:`Problem` takes beyond the shapes). Eager calls never
    come here: the api plans once and hands the plan down (:meth:`Plan.encode`). ``recompute``:
    the recompute strategy's plan (a backward op's)."""
    hints = {k: facts.pop(k) for k in ("student_x", "chunk") if k in facts}
    p = Problem(n, v, d, dtype, need_h, need_w, memory_budget=memory_budget, **facts)
    return recompute_plan(p, backend) if recompute else plan(p, backend, **hints)


def may_keep(p: Problem, backend: str) -> bool:
    """Whether a call may keep its logits (the strategy "keep"), from static facts: a call
    with per-token outputs that needs a gradient, on the Triton path, without filtering (whose
    backward skips classes instead), a budget that is not 0."""
    return (backend == "triton" and not p.reduced and not p.distill and not p.filtered
            and (p.need_h or p.need_w) and p.memory_budget != 0)


def _plan_loss(p: Problem, backend: str) -> Plan:
    n, v, d = p.n, p.v, p.d
    budget = budget_bytes(p, backend)
    lo = min(n, MIN_FUSED_CHUNK[backend])
    hi = min(n, MAX_FUSED_CHUNK)
    if backend == "torch" and p.chunk_bytes is not None:
        hi = max(lo, min(hi, p.chunk_bytes // (2 * v * 4)))
    best = None
    # Candidates: all tokens at once, the largest chunk that fits in dC's bytes (d), powers of
    # two. Fewest chunks wins (each chunk costs a pass over dC's accumulator), then the largest.
    for c in sorted({hi, min(hi, d)} | {1 << k for k in range(14) if lo <= 1 << k <= hi},
                    reverse=True):
        c = max(c, lo)
        if fused_extra_bytes(p, c, backend) > budget:
            continue
        key = (math.ceil(n / c), -c)
        if best is None or key < best[0]:
            best = (key, c)
    if best is None:
        return None
    c = best[1]
    chunks = math.ceil(n / c)
    # Same number of chunks, equal sizes (a multiple of 128, the GEMMs' tile): 8192 tokens in
    # chunks of 2304 left a last chunk of 1280 whose three products ran at a lower rate.
    if backend == "triton":
        c = min(c, max(lo, -(-math.ceil(n / chunks) // 128) * 128))
    acc16 = p.need_w and chunks > 1 and p.dtype != torch.float32
    return Plan("fused", chunk_n=c, dc_in_place=backend == "triton" and acc16 and c <= d,
                dc_f32=acc16)


# The torch path's fused distillation holds about this many float32 chunk x V temporaries
TORCH_DISTILL_TEMPS = 10


def _plan_distill(p: Problem, backend: str, student_x: bool, forced: int | None) -> Plan | None:
    if backend == "torch":
        # its chunk x V temporaries within the budget (the device's default chunk bytes at
        # most: the CPU gains nothing from more); below one token's row, recompute
        rows = int(budget_bytes(p, "torch")) // (TORCH_DISTILL_TEMPS * max(p.v, 1) * 4)
        return Plan("fused", chunk_n=min(p.n, rows)) if rows >= 1 else None
    n = p.n
    if forced is not None:
        c = min(forced, n)
    else:
        c = _distill_chunk(p, student_x) if student_x else None
        if c is None:
            c, student_x = _distill_chunk(p, False), False
    if c is None:
        return None
    acc16 = p.need_w and -(-n // c) > 1 and p.dtype != torch.float32
    return Plan("fused", chunk_n=c, dc_in_place=acc16 and c * v_pad(p.v) <= p.v * p.d,
                dc_f32=acc16, student_x=student_x)


def _distill_chunk(p: Problem, student_x: bool) -> int | None:
    # no cache: at most n / 256 steps of integer arithmetic (32 at 8192 tokens), and
    # torch.compile traces through this function (it warns about lru_cache wrappers)
    n = p.n
    budget = budget_bytes(p, "triton")
    for k in range(-(-n // MAX_DISTILL_CHUNK), -(-n // MIN_DISTILL_CHUNK) + 1):
        exact = -(-n // max(k, 1))
        for c in (min(n, -(-exact // 128) * 128), exact):
            if distill_extra_bytes(p, c, student_x) <= budget:
                return c
    return None


def recompute_dc_f32(p: Problem) -> bool:
    """Whether the recompute strategy's backward (Triton path) sums dC over token chunks in a
    float32 V x D accumulator: when the budget covers it (the default does at every shape, as
    V x D x 4 bytes <= 2 x the inputs). Below that (``memory_budget`` < ~2, 0 included), dC is
    rounded to the weight's dtype once per token chunk: its error grows with the number of
    chunks (docs/benchmarks.md measures it)."""
    if not p.need_w or p.dtype == torch.float32 or p.memory_budget == 0:
        return False
    return p.v * p.d * 4 <= budget_bytes(p, "triton")


def recompute_chunk_bytes(p: Problem) -> int:
    """Bytes of the recompute backward's :data:`RECOMPUTE_CHUNK` (Triton path)."""
    return chunks.recompute_chunk_bytes(p.n, p.v, p.d, p.dtype, p.need_h)


def recompute_spare_bytes(p: Problem) -> int:
    """Bytes the recompute strategy's backward may spend on its workspace (the logit-gradient
    chunks, dE's float32 accumulator; Triton path): what the budget leaves after dC's float32
    accumulator (:func:`recompute_dc_f32`), 0 at ``memory_budget=0``. The default budget
    (None) also covers :func:`recompute_chunk_bytes` where that is at most the gradients' size
    and dC's float32 accumulator is in the budget (or not needed): the fast chunks at large
    vocabularies, where 2x the inputs less dC's accumulator leaves too little for them."""
    if p.memory_budget == 0 or not (p.need_h or p.need_w):
        return 0
    dc_f32 = recompute_dc_f32(p)
    left = max(0, int(budget_bytes(p, "triton")) - (p.v * p.d * 4 if dc_f32 else 0))
    one_chunk = p.n <= RECOMPUTE_CHUNK[0] or not p.need_w or p.dtype == torch.float32
    chunk = recompute_chunk_bytes(p)
    if p.memory_budget is None and (dc_f32 or one_chunk) and chunk <= p.gradient_bytes():
        return max(left, chunk)
    return left


# ---- the device's free memory: memory_budget="auto", and a plan that does not fit ------------

# Kept free of a call's estimate: the allocator's fragmentation and the call's small temporaries.
SAFETY_FRACTION = 0.05
SAFETY_BYTES = 256 * 2**20


def usable_bytes(free_bytes: int) -> int:
    return max(0, int(free_bytes * (1.0 - SAFETY_FRACTION)) - SAFETY_BYTES)


def need_bytes(p: Problem, pl: Plan, backend: str) -> int:
    """Device memory a plan allocates beyond the call's inputs: its gradients and its extra."""
    g = p.gradient_bytes()
    if pl.fused and p.distill and backend == "torch":  # float32 chunk x V temporaries
        return g + TORCH_DISTILL_TEMPS * pl.chunk_n * p.v * 4
    if pl.strategy == "keep":
        return g + kept_bytes(p)
    if pl.fused:
        if p.distill:
            return g + distill_extra_bytes(p, pl.chunk_n, pl.student_x)
        return g + fused_extra_bytes(p, pl.chunk_n, backend)
    if backend == "torch":  # float32 copies of the weight and its gradient, one chunk of logits
        copies = 0 if p.dtype in (torch.float32, torch.float64) else 2 * p.v * p.d * 4
        cdt = 8 if p.dtype == torch.float64 else 4
        return g + copies + min(p.chunk_bytes or 256 * 2**20, 3 * p.n * p.v * cdt)
    pl = recompute_plan(p, backend)
    # never more than the whole backward could use (all logit gradients and a float32 dE); its
    # O(N) values (lse, parts, upstream gradients) are left to the safety margin
    work = min(pl.workspace, p.n * (p.v * elt(p.dtype) + p.d * 4))
    return g + work + (p.v * p.d * 4 if pl.dc_f32 else 0)


def auto_budget(p: Problem, free_bytes: int) -> float:
    """memory_budget="auto": what the usable free memory leaves beyond the gradients, as a
    fraction of the inputs' size."""
    return max(0, usable_bytes(free_bytes) - p.gradient_bytes()) / max(p.input_bytes(), 1)


def out_of_memory_message(p: Problem, backend: str, free_bytes: int | None) -> str:
    """What a call that cannot fit even at memory_budget=0 says: how much it needs (the
    minimum's need_bytes), its gradients' share, and what was free (when known)."""
    least = need_bytes(dataclasses.replace(p, memory_budget=0.0), RECOMPUTE, backend)
    free = "" if free_bytes is None else f", but only {free_bytes / 2**30:.2f} GiB are free"
    return (f"cutce: this call needs about {least / 2**30:.2f} GiB of device memory even at "
            f"memory_budget=0 (its gradients: {p.gradient_bytes() / 2**30:.2f} GiB){free}; "
            f"pass fewer tokens per call or free memory")


def out_of_memory_in_op(backend: str, n: int, v: int, d: int, dtype: torch.dtype, need_h: bool,
                        need_w: bool, memory_budget, free_bytes: int | None) -> str:
    """:func:`out_of_memory_message` for a backend op's call, described from its shapes (as
    :func:`plan_in_op` describes it)."""
    p = Problem(n, v, d, dtype, need_h, need_w, memory_budget=memory_budget)
    return out_of_memory_message(p, backend, free_bytes)


def settle(p: Problem, backend: str, free_bytes: int | None, **hints) -> tuple[Plan, float | None, str | None]:
    """(plan, the numeric memory_budget it runs with, why it fell back or None) for a call whose
    device has ``free_bytes`` available (None: unknown, e.g. CPU tensors or under torch.compile).

    ``memory_budget="auto"`` becomes the budget the free memory leaves (the default's when it is
    unknown), so the plan is the fastest that fits and is the same for the same free memory. Any
    budget whose plan needs more than the usable free memory falls back to the minimum
    (recompute, dC rounded per token chunk: ``memory_budget=0``), and says why; when even that
    needs more than is free, raises ``torch.OutOfMemoryError`` saying how much it needs."""
    asked = budget = p.memory_budget
    if budget == "auto":
        budget = None if free_bytes is None else auto_budget(p, free_bytes)
        p = dataclasses.replace(p, memory_budget=budget)
    fast = may_fuse(p, backend) or may_keep(p, backend)
    pl = plan(p, backend, **hints) if fast else recompute_plan(p, backend)
    if free_bytes is None or not (p.need_h or p.need_w):
        return pl, budget, None
    need, usable = need_bytes(p, pl, backend), usable_bytes(free_bytes)
    if need <= usable:
        return pl, budget, None
    low = dataclasses.replace(p, memory_budget=0.0)
    least = need_bytes(low, RECOMPUTE, backend)
    if least > free_bytes:  # nothing fits: say so now, in numbers, not deep inside a kernel
        raise torch.OutOfMemoryError(out_of_memory_message(p, backend, free_bytes))
    if least >= need:  # already the minimum (within the safety margin): let it try
        return pl, budget, None
    why = (f"cutce: memory_budget={asked!r} plans the {pl.strategy} strategy, which "
           f"needs about {need / 2**30:.2f} GiB, but {usable / 2**30:.2f} GiB of device memory are "
           f"usable; running the minimum-memory strategy instead (memory_budget=0, about "
           f"{least / 2**30:.2f} GiB)")
    return plan(low, backend), 0.0, why
