"""Every chunk size of every strategy, and the one constant per idea behind it.

The planner (:mod:`cutce.engine.planner`) reads these to make a :class:`~cutce.engine.planner.Plan`;
the backends run the chunks a plan names. Where a chunk depends on what only the backward knows
(how many classes a filtered backward visits) or on a kernel's tile, the backend calls the
function here with those facts and the plan's workspace bytes, so no backend has a sizing rule
or a memory fraction of its own.
"""

from __future__ import annotations

import math

import torch

from .problem import Problem, elt

# ---- fused strategies -------------------------------------------------------------------------

# Fewer tokens per chunk than this and the loss's fused strategy loses to recompute on the GPU:
# the dE product of a chunk (chunk x D outputs, K = V) gets too few output tiles and dC's float32
# accumulator is passed over too often (H200, D=1024, V=128256, chunks of 1024: 24.3 ms vs
# 22.1 ms per model step; chunks of 2304 and 4096 at the Gemma and Llama heads win 14-21%).
MIN_FUSED_CHUNK = {"triton": 2048, "torch": 64}
# Most tokens per chunk (the GEMMs gain nothing beyond; each chunk's dC pass costs V x D x 8 bytes).
MAX_FUSED_CHUNK = 8192
# Distillation (Triton): chunks of fewer tokens starve the dz passes; beyond ~1400 tokens a chunk
# gains <= 2% for ~150 MiB more at the Qwen2.5 7B -> 0.5B pair (H200: 1664-token chunks 2%
# faster than 1408, 896-token chunks 10% slower), so larger budgets keep this cap.
MIN_DISTILL_CHUNK = 256
MAX_DISTILL_CHUNK = 1536

# ---- the recompute strategy's backward --------------------------------------------------------

# The (tokens, classes) chunk wherever a budget above 0 holds it (with dC's float32 accumulator
# when it splits the tokens): its dE product fills the GPU and the float32 dC is passed over
# once per 4096 tokens. H100, log-probs + entropy forward+backward: 54.3 / 114.5 / 117.9 ms at
# N x D x V = 24576 x 896 x 151936, 32768 x 2048 x 128256, 16384 x 3584 x 152064, against 58.0 /
# 127.7 / 121.8 ms for the chunks of an 8%-of-the-gradients workspace (TRL's fused head, whose
# chunks these are: 52.6 / 115.4 / 116.3 ms).
RECOMPUTE_CHUNK = (4096, 32768)
# The workspace a recompute backward may always use beyond the gradients, as a fraction of the
# inputs' bytes (for a call that trains hidden and weight: of the gradients), loss and
# distillation alike: the float32 dE half that does not fit in dE's rows and the logit-gradient
# chunks. At the Qwen 7B -> 0.5B distillation (N=8192) that leaves 512-class chunks (14 MiB of
# dE's half + 8 MiB); the distillation's own 9% gave 640. Never below MIN_WORKSPACE_BYTES.
RECOMPUTE_WORKSPACE = 0.08
MIN_WORKSPACE_BYTES = 16 * 2**20
# A launch priced as bytes of traffic in the chunk cost model (~20 us)
LAUNCH_BYTES = 80e6


def recompute_chunk_bytes(n: int, v: int, d: int, dtype: torch.dtype, need_h: bool) -> int:
    """Bytes of the recompute backward's :data:`RECOMPUTE_CHUNK`: its logit gradients in the
    inputs' dtype and its float32 dE rows (~290 MB at D=2048, bf16)."""
    rows = min(n, RECOMPUTE_CHUNK[0])
    cols = min(-(-v // 256) * 256, RECOMPUTE_CHUNK[1])  # whole 256-class tiles (Hopper bwd)
    return rows * cols * elt(dtype) + rows * d * 4 * need_h


def workspace_floor(n: int, v: int, d: int, dtype: torch.dtype) -> int:
    """The workspace every recompute backward may use: :data:`RECOMPUTE_WORKSPACE` of its
    inputs' bytes, at least :data:`MIN_WORKSPACE_BYTES`."""
    return max(int(RECOMPUTE_WORKSPACE * (n + v) * d * elt(dtype)), MIN_WORKSPACE_BYTES)


def recompute_chunks(n, n_cls, v, d, dtype, need_h, need_w, split_acc, tail, gather, block_v,
                     min_v, max_v, workspace):
    """(chunk_n, chunk_v) of the loss's recompute backward within ``workspace`` bytes (the
    plan's), for n tokens and the n_cls classes visited of v. ``split_acc``: dE's float32
    accumulator keeps half its columns in dE's rows; ``tail``: dz may live in dC's unwritten
    rows; ``gather`` (filtered classes): each chunk also holds its gathered weight rows and its
    dC rows before they are scattered, 2 * d values per class. ``block_v``, ``min_v``, ``max_v``:
the kernel's tile and its narrowest and widest vocabulary chunks (KernelConfig's tuning).

    Cost model (bytes of extra traffic; launches priced as bytes): the float32 dE accumulator is
    read and written once per vocabulary chunk (n*d*8 bytes each, whatever chunk_n), dC rows
    once more per extra token chunk. With one token chunk and ``tail`` most chunks are
    ``max_v`` wide.
    """
    e = elt(dtype)
    acc_row = 0 if not need_h or dtype == torch.float32 else (d // 2 if split_acc else d) * 4
    v_pad = -(-n_cls // block_v) * block_v
    best = None
    for parts in range(1, min(n, 256) + 1):
        cn = -(-n // parts)
        cv = int((workspace - cn * acc_row) // ((cn + 2 * d * gather) * e)) // block_v * block_v
        if cv < min_v and parts < min(n, 256) and cn > 128:
            continue
        cv = min(max(cv, min_v), v_pad)
        wide = max(cv, max_v) if (tail and parts == 1) else cv
        passes = math.ceil(n_cls / wide)
        cost = (need_h * n * d * 8 * passes + need_w * (parts - 1) * n_cls * d * e * 2
                + parts * passes * LAUNCH_BYTES)
        if best is None or cost < best[0]:
            best = (cost, cn, cv)
        if cv >= v_pad:
            break
    return best[1], best[2]


def distill_chunk_v(n, v, workspace, held, dz_bytes, block_v, min_v):
    """Classes per chunk of the distillation's recompute backward (all n tokens at once): what
    ``workspace`` bytes leave after ``held`` (dE's float32 halves, per-token values) for
    ``dz_bytes`` bytes per (token, class), rounded down to the tile (a ceiling), at least
    ``min_v``, at most v."""
    cv = int((workspace - held) // max(n * dz_bytes, 1)) // block_v * block_v
    return min(v, max(min_v, cv))


# ---- bytes of a chunk ---------------------------------------------------------------------------

def kept_width(v: int, dtype: torch.dtype) -> int:
    """Columns of a kept-logits row: V padded to 16 bytes (cuBLAS operands)."""
    pad = 16 // elt(dtype)
    return -(-v // pad) * pad


def kept_bytes(p: Problem) -> int:
    """Bytes of the kept logits: N x V in the inputs' dtype, rows padded to 16 bytes."""
    return p.n * kept_width(p.v, p.dtype) * elt(p.dtype)


def fused_extra_bytes(p: Problem, chunk_n: int, backend: str) -> int:
    """Extra bytes of the loss's fused strategy with this chunk (see :mod:`cutce.engine.planner`)."""
    n, v, d, e = p.n, p.v, p.d, elt(p.dtype)
    if backend == "torch":  # compute-dtype temporaries; dC summed in the compute dtype
        cdt = 8 if p.dtype == torch.float64 else 4
        w_copy = 0 if e == cdt else 2 * v * d * cdt  # float32 weight + its float32 gradient
        return 2 * chunk_n * v * cdt + chunk_n * d * cdt + w_copy
    acc16 = p.need_w and math.ceil(n / chunk_n) > 1 and p.dtype != torch.float32
    x = 0 if acc16 and chunk_n <= d else chunk_n * v * e
    return x + (v * d * 4 if acc16 else 0) + chunk_n * d * (4 + e)


def v_pad(v: int) -> int:
    return -(-v // 8) * 8  # 16-byte aligned rows of the 16-bit exponentials (cuBLAS operands)


def distill_extra_bytes(p: Problem, chunk: int, student_x: bool = False, block_v: int = 128) -> int:
    """Extra bytes of the fused distillation (Triton) with this chunk: the teacher's 16-bit
    exponentials X (or 0 in dC's bytes), dC's float32 accumulator, the tile-max table and the
    JSD's two per-tile sums, dE's float32 chunk result, the splits' partials (~512 bytes a row)
    and per-token values; with ``student_x`` the student's exponentials and their table too."""
    n, v, ds = p.n, p.v, p.d
    chunks = -(-n // chunk)
    acc = v * ds * 4 if p.need_w and chunks > 1 and p.dtype != torch.float32 else 0
    in_place = acc > 0 and chunk * v_pad(v) <= v * ds
    row = v_pad(v) * elt(p.dtype)
    x = (0 if in_place else chunk * row) + student_x * chunk * row
    tables = (3 + student_x) * -(-v // block_v) * 4
    return x + acc + chunk * (tables + ds * 4 * p.need_h + 512) + n * 16
