"""Block sizes per device and dtype, and the knobs the launchers share.

The interpreter (TRITON_INTERPRET=1) runs one program after another on the CPU, ~20-30 ms per
loop iteration whatever the block size, and cannot autotune: small fixed blocks keep the CPU tests
to seconds. On the GPU the tiles feed Hopper's tensor cores (128-wide, BLOCK_K 64).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 3


INTERPRETER_TILE = TileConfig(16, 32, 16, num_warps=1, num_stages=1)


def _env_tile(name):
    """A tile from e.g. CUTCE_FWD_TILE="128,256,64,8,3" (for tuning runs only)."""
    spec = os.environ.get(name)
    return TileConfig(*map(int, spec.split(","))) if spec else None


def forward_tile(dtype: torch.dtype) -> TileConfig:
    if interpreting():
        return INTERPRETER_TILE
    if _env_tile("CUTCE_FWD_TILE"):
        return _env_tile("CUTCE_FWD_TILE")
    if dtype == torch.float32:
        return TileConfig(128, 64, 32, num_warps=8, num_stages=3)
    # Measured on the H200 at the Gemma shape (docs/perf-notes.md): 128x256x64 beat 128x128.
    return TileConfig(128, 256, 64, num_warps=8, num_stages=3)


def backward_tile(dtype: torch.dtype) -> TileConfig:
    if not interpreting() and _env_tile("CUTCE_BWD_TILE"):
        return _env_tile("CUTCE_BWD_TILE")
    return forward_tile(dtype)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def vocab_splits(n_row_blocks: int, n_tiles: int, device: torch.device, group: int = 1) -> int:
    """How many vocabulary splits the forward launches per token block.

    One program runs per SM (the tiles take most of its shared memory), so the time goes as
    waves x tiles per program = ceil(blocks * s / SMs) * ceil(tiles / s): pick the s that
    minimizes it (the wave quantization of a naive choice cost ~20% at the Gemma shape), with
    at least SMs / group splits so that a wave spans one group of token blocks (see group_rows).
    """
    if device.type != "cuda":
        return 1 if n_row_blocks > 1 else min(2, n_tiles)  # exercise both paths on CPU
    if os.environ.get("CUTCE_VOCAB_SPLITS"):  # tuning runs only
        return max(1, min(n_tiles, int(os.environ["CUTCE_VOCAB_SPLITS"])))
    sms = num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return _best_splits(n_row_blocks, n_tiles, sms, group)


@functools.lru_cache(maxsize=1024)
def _best_splits(n_row_blocks: int, n_tiles: int, sms: int, group: int) -> int:
    # cached: a Python loop of up to 4 * SMs steps ran before every launch (host time the GPU
    # waits for at the start of a call)
    lo = min(n_tiles, -(-sms // max(1, group)) if n_row_blocks > group else 1)
    best, best_cost = lo, None
    for s in range(lo, min(n_tiles, 4 * sms) + 1):
        # +2 tiles per program: its pipeline fill and its partial results
        cost = -(-n_row_blocks * s // sms) * (-(-n_tiles // s) + 2)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def group_rows(block_bytes: int, device: torch.device) -> int:
    """Token blocks the forward's programs share at a time: their hidden blocks take a third of
    L2 (at 65536 tokens, 512 distinct 0.6 MB blocks thrashed L2: forward 1.28x vs 1.07x)."""
    if device.type != "cuda":
        return 2  # exercise full and partial groups in the tests
    if os.environ.get("CUTCE_GROUP_ROWS"):  # tuning runs; 0 = one group of all token blocks
        return int(os.environ["CUTCE_GROUP_ROWS"]) or 1 << 30
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, l2 // 3 // block_bytes)


def fp32_matmul_uses_tf32() -> bool:
    """Whether PyTorch's own CUDA float32 matmuls may use TF32: the new per-backend setting
    (``torch.backends.cuda.matmul.fp32_precision``), else the global one, else the legacy
    ``allow_tf32`` (``set_float32_matmul_precision("high")`` sets it). Reading the legacy flag
    raises once the new API was used, so it is read last and only when needed."""
    matmul = torch.backends.cuda.matmul
    for prec in (getattr(matmul, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None)):
        if prec in ("tf32", "ieee"):
            return prec == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get IEEE float32 dots unless the user made PyTorch's float32 matmuls TF32
    (then TF32, as F.linear would); 16-bit inputs ignore it."""
    if dtype == torch.float32 and not fp32_matmul_uses_tf32():
        return "ieee"
    return "tf32"


# Tests set this to fill every launcher allocation with NaN, so unwritten memory shows up.
POISON = False
# The interpreter truncates float32 -> 16-bit stores instead of rounding to nearest as the GPU
# does: workspaces of 16-bit values are kept in float32 there (tests may turn this off to walk
# the 16-bit-only code paths, at a truncation's error).
INTERPRETER_F32_WORKSPACE = True


def workspace_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if interpreting() and INTERPRETER_F32_WORKSPACE else dtype

# Tensor-memory-accelerator loads: None = wherever they can run (see use_tma); tests and tuning
# force True/False (env CUTCE_TMA=0/1 for tuning runs).
TMA = None
# Let the compiler flatten the tile loop with its K loop into one software pipeline, so the next
# tile's loads are in flight during a tile's softmax epilogue (env CUTCE_FLATTEN=0/1 for tuning).
FLATTEN = True
# Compute each row's target logit inside the forward's epilogue (True) or by a separate small
# gather kernel (False: one compare-select-reduce less per tile element).
ZT_IN_KERNEL = False


# Write a tile of the fused strategy's X (or distillation's X / dz) by a bulk (TMA) store instead
# of a tile of 64-bit addresses: on sm_90 the address tile spills ~2-4 KB of registers per thread
# (scripts/gpu_compile.py --spills). Measured on the H200 (`gpu_session.sh tune`, 2026-11-29):
# distillation's JSD 72.0 -> 53.8 ms and forward KL 35.5 -> 34.9 ms with it; the loss's fused
# logit kernel within noise (Gemma 45.9 -> 45.3 ms, V=32k 19.7 -> 20.2 ms), so it stays off there.
# None = these per-kernel defaults; env CUTCE_TILE_STORE=0/1 overrides both (tuning); tests force
# True/False to cover both paths.
TILE_STORE = None
TILE_STORE_DEFAULT = {"loss": False, "distill": True}


def tile_store(kernel: str) -> bool:
    """Whether `kernel` ("loss" or "distill") writes its 2-D tiles by bulk stores."""
    if TILE_STORE is not None:
        return TILE_STORE
    env = os.environ.get("CUTCE_TILE_STORE")
    return env == "1" if env else TILE_STORE_DEFAULT[kernel]


# Fused distillation without the student's recompute: the statistics kernel also writes the
# student's Xs = exp(z_s/T - its tile max) in 16 bits, and the dz passes become elementwise
# (triton/distill_dz.py) instead of a second student product each. Costs one more chunk x V
# buffer, within the budget (the plan then picks smaller chunks); calls with a CE term or a
# student softcap keep the product. Measured on the H200 at the Qwen 7B -> 0.5B pair (eighth
# session, docs/benchmarks.md): JSD 45.8 -> 37.3 ms, forward KL 35.2 -> 31.8 ms at budget 6;
# at budget 3 faster (40.3 / 35.1 ms) and smaller (1079 vs 1314 MiB) than budget 4 without.
# Env CUTCE_DISTILL_STUDENT_X=0 turns it off (A/Bs).
DISTILL_STUDENT_X = None


def distill_student_x() -> bool:
    if DISTILL_STUDENT_X is not None:
        return DISTILL_STUDENT_X
    return os.environ.get("CUTCE_DISTILL_STUDENT_X", "1") != "0"


# The distillation's recompute kernels (memory_budget=0, reduction "none", the reverse KL, a
# teacher that needs gradients) by bulk (TMA) loads on Hopper, as the fused ones and the loss's
# forward. Measured on the H200 at the Qwen 7B -> 0.5B pair, budget 0 (ninth session,
# docs/perf-notes.md v9): forward KL 68.1 -> 61.5 ms, JSD 99.4 -> 90.2, reverse KL 68.5 -> 61.8.
# On by default; env CUTCE_DISTILL_RECOMPUTE_TMA=0 turns it off (pointer loads, as on an A100).
DISTILL_RECOMPUTE_TMA = None


def distill_recompute_tma() -> bool:
    if DISTILL_RECOMPUTE_TMA is not None:
        return DISTILL_RECOMPUTE_TMA
    return os.environ.get("CUTCE_DISTILL_RECOMPUTE_TMA", "1") != "0"


def zt_in_kernel() -> bool:
    env = os.environ.get("CUTCE_ZT_IN_KERNEL")
    return env == "1" if env else ZT_IN_KERNEL


def use_tma(*tensors) -> bool:
    """Whether the kernels may load these 2-D tensors through tensor descriptors: Hopper or newer
    (or the interpreter), unit inner stride, 16-byte aligned base and row stride, no empty
    dimension (a descriptor's shape must be positive: an empty call, e.g. shift=True on
    one-token sequences, takes the pointer path, whose launchers skip empty grids)."""
    forced = TMA
    if forced is None and os.environ.get("CUTCE_TMA"):
        forced = os.environ["CUTCE_TMA"] == "1"
    if forced is False:
        return False
    for t in tensors:
        if t.dim() != 2 or t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16 \
                or (t.stride(0) * t.element_size()) % 16:
            return False
    if forced or interpreting():
        return True
    t = tensors[0]
    return t.is_cuda and _capability(t.device.index)[0] >= 9


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (cached)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(device_index):
    # cached: the query took ~40 us of host time per launch
    return torch.cuda.get_device_capability(device_index)


def flatten() -> bool:
    env = os.environ.get("CUTCE_FLATTEN")
    return env == "1" if env else FLATTEN


def persistent_programs(n_tiles: int, device: torch.device, env: str = "CUTCE_DZ_PROGRAMS_PER_SM",
                        per_sm: int | None = None) -> int:
    """Programs of a dz kernel's persistent launch: ``per_sm`` (default PROGRAMS_PER_SM; the
    environment variable ``env`` overrides it) per SM, 0 = one program per tile (no
    persistence); on the CPU a few, so that the tests walk the tile loop."""
    if device.type != "cuda":
        return max(1, min(n_tiles, 3))
    per_sm = int(os.environ.get(env, PROGRAMS_PER_SM if per_sm is None else per_sm))
    if per_sm <= 0:
        return n_tiles
    sms = num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_tiles, per_sm * sms))


PROGRAMS_PER_SM = 1

# Extra memory the backward may use beyond the gradients themselves, as a fraction of them.
BACKWARD_MEMORY_FRACTION = 0.08
# Filtering keeps going only while it skips enough: past this fraction of kept classes the
# backward visits all of them densely (faster than gathering them, and exact).
FILTER_DENSE_FRACTION = 0.5
# Never use vocabulary chunks narrower than this (GEMM efficiency), whatever the budget says.
MIN_CHUNK_V = 1024
# Widest vocabulary chunk when the chunk's dz can live in the not-yet-written rows of dC (wider
# chunks mean fewer passes over the float32 dE accumulator).
MAX_CHUNK_V = int(os.environ.get("CUTCE_MAX_CHUNK_V", "8192"))
