"""Every tuning value of the Triton kernels, as data: :class:`KernelConfig`, its presets per
device, and the one way to change them for an experiment (:func:`override`).

The interpreter (TRITON_INTERPRET=1) runs one program after another on the CPU, ~20-30 ms per
loop iteration whatever the block size, and cannot autotune: small fixed blocks keep the CPU tests
to seconds. On the GPU the tiles feed Hopper's tensor cores (128-wide, BLOCK_K 64).

Launchers read the values through :func:`current` (one preset per device, cached); nothing here
reads the environment except Triton's own TRITON_INTERPRET. To try other values::

    from cutce.backends.triton import configs
    with configs.override(tma=False, fwd_tile=configs.TileConfig(128, 128, 64)):
        loss = cutce.linear_cross_entropy(h, w, t, impl="triton")
        loss.backward()
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import threading

import torch

from ...engine.device import DeviceFacts, facts


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
# The last step of a kernel that does not fit its device (triton/fit.py): the smallest tile
# tl.dot takes, a few KB of shared memory on any GPU
MINIMAL_TILE = TileConfig(16, 16, 16, num_warps=1, num_stages=1)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """The kernels' tuning values. ``*_tile`` serve 16-bit inputs, ``*_tile_f32`` float32 ones."""

    # the loss's forward (recompute and fused strategies); measured on the H200 at the Gemma
    # shape: 128x256x64 beat 128x128
    fwd_tile: TileConfig = TileConfig(128, 256, 64, num_warps=8, num_stages=3)
    fwd_tile_f32: TileConfig = TileConfig(128, 64, 32, num_warps=8, num_stages=3)
    # the loss's backward (dz kernel); None = the forward's tile
    bwd_tile: TileConfig | None = None
    bwd_tile_f32: TileConfig | None = None
    # the dz kernel when it also takes the entropy's gradient, whose epilogue holds more
    # tile-sized values; None = bwd_tile (see HOPPER)
    bwd_entropy_tile: TileConfig | None = None
    bwd_entropy_tile_f32: TileConfig | None = None
    # distillation's recompute kernels: two float32 tiles live at once (student's and teacher's),
    # half the loss's width. 4 stages: 68.3 vs 74.1 ms (H200, Qwen 7B -> 0.5B pair, forward KL,
    # budget 0); 5 would not fit an A100's shared memory
    distill_tile: TileConfig = TileConfig(128, 128, 64, 8, 4)
    distill_tile_f32: TileConfig = TileConfig(64, 64, 32, 4, 3)
    # distillation's fused kernels (statistics and dz): the recompute tile (on the H200 at the
    # Qwen pair also the fused kernels' best of 64x128, 128x256, 256x128, BLOCK_K 32 or 128 and
    # 4 warps); Hopper takes 5 stages (see HOPPER)
    distill_fused_tile: TileConfig = TileConfig(128, 128, 64, 8, 4)
    distill_fused_tile_f32: TileConfig = TileConfig(64, 64, 32, 4, 3)
    # (rows per program, warps) of the fused distillation's elementwise dz passes: memory-bound,
    # so small tiles and many programs
    dz_ew_tile: tuple[int, int] = (16, 4)
    # (BLOCK_N, BLOCK_K, warps) of the target-logit gather kernel, (BLOCK_R, BLOCK_C, warps) of
    # the fused strategy's row scaling, BLOCK of the row-coefficient kernel
    target_tile: tuple[int, int, int] = (32, 128, 4)
    row_scale_tile: tuple[int, int, int] = (16, 256, 4)
    # (BLOCK_N, BLOCK_V, warps) of the kept-logits backward's elementwise dz pass: memory-bound;
    # 8 x 512 compiles to ~105 registers and no spills on sm_90 (32 x 256: 255 and spills)
    kept_tile: tuple[int, int, int] = (8, 512, 8)
    rows_block: int = 1024
    # Tensor-memory-accelerator (descriptor) loads: None = wherever they can run (use_tma),
    # False = pointer loads, True = wherever the operands' layout allows them
    tma: bool | None = None
    # Let the compiler flatten the tile loop with its K loop into one software pipeline, so the
    # next tile's loads are in flight during a tile's softmax epilogue (descriptor loads only)
    flatten: bool = True
    # Write a 2-D tile of the fused strategies' X (or distillation's X / dz) by a bulk (TMA)
    # store instead of a tile of 64-bit addresses, which spills ~2-4 KB of registers per thread
    # on sm_90. Measured on the H200: distillation's JSD 72.0 -> 53.8 ms and forward KL 35.5 ->
    # 34.9 ms with it; the loss's fused logit kernel within noise (Gemma 45.9 -> 45.3 ms, V=32k
    # 19.7 -> 20.2 ms), so it stays off there
    loss_tile_store: bool = False
    distill_tile_store: bool = True
    # Fused distillation without the student's recompute: the statistics kernel also writes the
    # student's Xs = exp(z_s/T - its tile max) in 16 bits and the dz passes become elementwise
    # (triton/distill_dz.py). One more chunk x V buffer, within the budget; calls with a CE term
    # or a student softcap keep the product. H200, Qwen 7B -> 0.5B pair: JSD 45.8 -> 37.3 ms,
    # forward KL 35.2 -> 31.8 ms at budget 6; at budget 3 faster (40.3 / 35.1 ms) and smaller
    # (1079 vs 1314 MiB) than budget 4 without
    distill_student_x: bool = True
    # The distillation's recompute kernels by bulk loads where tma allows them. H200, Qwen pair,
    # budget 0: forward KL 68.1 -> 61.5 ms, JSD 99.4 -> 90.2, reverse KL 68.5 -> 61.8
    distill_recompute_tma: bool = True
    # Programs per SM of the dz kernels' persistent launch, 0 = one program per tile (the
    # distillation's fused dz: persistence not yet measured on the GPU)
    dz_programs_per_sm: int = 1
    distill_dz_programs_per_sm: int = 0
    # Vocabulary splits per token block and token blocks per program group of the forward:
    # None = the computed rules (vocab_splits, group_rows); group_rows 0 = one group of all
    vocab_splits: int | None = None
    group_rows: int | None = None
    # Filtering keeps going only while it skips enough: past this fraction of kept classes the
    # backward visits all of them densely (faster than gathering them, and exact)
    filter_dense_fraction: float = 0.5
    # The loss backward's vocabulary chunks: never narrower than min_chunk_v (GEMM efficiency),
    # at most max_chunk_v when dz lives in dC's not-yet-written rows (wider chunks mean fewer
    # passes over the float32 dE accumulator); the distillation backward's narrowest chunk
    min_chunk_v: int = 1024
    max_chunk_v: int = 8192
    distill_min_chunk_v: int = 512
    # Test aids: tokens per chunk of the fused distillation (None = its plan's); fill every
    # launcher allocation with NaN so that unwritten memory shows up; keep 16-bit workspaces in
    # float32 in the interpreter, which truncates float32 -> 16-bit stores instead of rounding
    # to nearest as the GPU does (off: walk the 16-bit-only code paths, at a truncation's error)
    distill_chunk: int | None = None
    # Test aid: at most (tokens, classes) per chunk of the recompute backward where its plan
    # names the preferred chunk (None: the plan's, cutce.engine.chunks.RECOMPUTE_CHUNK)
    recompute_chunk_cap: tuple[int, int] | None = None
    poison: bool = False
    interpreter_f32_workspace: bool = True

    def tile(self, kernel: str, dtype: torch.dtype) -> TileConfig:
        """The tile of `kernel` ("fwd", "bwd", "bwd_entropy", "distill", "distill_fused") for
        inputs of dtype; an unset one is its fallback's ("bwd_entropy" -> "bwd" -> "fwd")."""
        suffix = "_f32" if dtype == torch.float32 else ""
        while (t := getattr(self, f"{kernel}_tile{suffix}")) is None:
            kernel = {"bwd_entropy": "bwd"}.get(kernel, "fwd")
        return t


# Hopper and newer (sm_90+), measured on the H200. 5 stages for the fused distillation: 32.5 vs
# 33.7 ms JSD, 31.1 vs 31.6-32.1 ms forward KL against 4 (3: 38.6 / 36.3); with bulk stores they
# take 229 KB of shared memory in the dz kernel (the limit is 227 KiB: 6 do not fit).
# The entropy's dz tile, on an H100 (bf16 log-probs + entropy, fwd+bwd ms, 128x256 -> 128x128):
# N x D x V 24576x896x151936 56.0 -> 48.4, 8192x2304x256000 66.7 -> 62.7, 32768x2048x128256
# 115.0 -> 110.8, 16384x3584x152064 111.5 -> 111.7; without the entropy 128x256 stays ahead
# (46.1 vs 47.2, 110.0 vs 114.0 ms), so only the entropy's backward takes it
HOPPER = KernelConfig(distill_fused_tile=TileConfig(128, 128, 64, 8, 5),
                      bwd_entropy_tile=TileConfig(128, 128, 64, 8, 4))
# The NVIDIA GPUs without Hopper's shared memory (the A100; the 99 KiB parts: A10, L4, L40S,
# RTX 30/40/50): pointer loads, the distillation's 4 stages (see PRESETS for the bytes)
PRE_HOPPER = KernelConfig(tma=False)
# Triton's interpreter on the CPU: small blocks (its time goes per loop iteration), the fused
# distillation's a little wider
INTERPRETER = KernelConfig(
    fwd_tile=INTERPRETER_TILE, fwd_tile_f32=INTERPRETER_TILE,
    distill_tile=INTERPRETER_TILE, distill_tile_f32=INTERPRETER_TILE,
    distill_fused_tile=TileConfig(32, 64, 32, 1, 1),
    distill_fused_tile_f32=TileConfig(32, 64, 32, 1, 1),
    dz_ew_tile=(32, 4), target_tile=(16, 16, 1), row_scale_tile=(16, 32, 1), rows_block=64,
    kept_tile=(16, 32, 1), recompute_chunk_cap=(32, 64))  # several chunks at test sizes

# The presets a GPU may take, fastest first: (preset, the shared memory per block its largest
# kernel takes, whether it needs tensor descriptors). Compiled by tools/gpu_compile.py, whose
# test holds every target to these: HOPPER's distillation dz kernel 229,432 bytes on sm_90,
# 229,448 on sm_100; the A100's tiles 98,304 on sm_80/86/89/120 (pointer loads keep stages - 1
# operand buffers), so they fit the 99 KiB parts too, where the descriptor path's barriers and
# staging tiles would not (the Hopper tiles take 102-197 KB on sm_120).
PRESETS = ((HOPPER, 229448, True), (PRE_HOPPER, 98304, False))

# torch that hands the backward caller's context to autograd's device threads (and removes it
# from the calling thread after the backward)
_STASHED_CONTEXT = hasattr(torch._C, "_remove_obj_from_tls") and hasattr(torch._C, "_is_key_in_tls")
_OPEN: list = []  # the overrides open in any thread, innermost last
_OPEN_LOCK = threading.Lock()
_FOREIGN_THREAD = getattr(threading, "_DummyThread", ())
_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("cutce_kernel_config", default=None)


def preset_for(f: DeviceFacts) -> KernelConfig:
    """The preset of a GPU with these facts (a pure function: testable without the GPU): the
    first of :data:`PRESETS` that fits its shared memory and its TMA, else the last (whose
    kernels then shrink at their first launch: triton/fit.py)."""
    for cfg, need, tma in PRESETS:
        if need <= f.shared_memory and (f.tma or not tma):
            return cfg
    return PRESETS[-1][0]


def preset(device: torch.device | str | None) -> KernelConfig:
    """The preset for tensors on `device`: INTERPRETER while Triton interprets, else the one
    its facts give (:func:`preset_for`; PRE_HOPPER off CUDA)."""
    if interpreting():
        return INTERPRETER
    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda":
        return PRE_HOPPER
    return preset_for(facts(device))


def current(device: torch.device | str | None) -> KernelConfig:
    """The configuration launches on `device` use: its preset, changed by any active override."""
    change = _active_override()
    base = preset(device)
    return base if change is None else change(base)


def _active_override():
    change = _OVERRIDE.get()
    if change is None and isinstance(threading.current_thread(), _FOREIGN_THREAD):
        # CUDA backward runs on autograd's device threads (not Python's), which do not enter
        # the caller's context: torch >= 2.13 hands them a copy of it; older ones do not, and
        # there the innermost override open in any thread applies
        if _STASHED_CONTEXT and torch._C._is_key_in_tls("context"):
            ctx = torch._C._get_obj_in_tls("context")
            if isinstance(ctx, contextvars.Context):
                return ctx.get(_OVERRIDE)
        with _OPEN_LOCK:
            change = _OPEN[-1] if _OPEN else None
    return change


@contextlib.contextmanager
def override(base: KernelConfig | None = None, /, **changes):
    """Within the block, launches use `base` (default: the device's preset) with `changes`
    (:class:`KernelConfig` field names: an unknown name raises TypeError). Scoped to the
    current thread or task (a ContextVar), and seen by the backward of what it launched;
    nested overrides apply in order."""
    dataclasses.replace(base or HOPPER, **changes)  # reject unknown field names now
    outer = _OVERRIDE.get()

    def change(cfg: KernelConfig) -> KernelConfig:
        if base is not None:
            cfg = base
        elif outer is not None:
            cfg = outer(cfg)
        return dataclasses.replace(cfg, **changes)
    token = _OVERRIDE.set(change)
    with _OPEN_LOCK:
        _OPEN.append(change)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)
        with _OPEN_LOCK:
            _OPEN.remove(change)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def vocab_splits(n_row_blocks: int, n_tiles: int, device: torch.device, group: int = 1) -> int:
    """How many vocabulary splits the forward launches per token block.

    One program runs per SM (the tiles take most of its shared memory), so the time goes as
    waves x tiles per program = ceil(blocks * s / SMs) * ceil(tiles / s): pick the s that
    minimizes it (the wave quantization of a naive choice cost ~20% at the Gemma shape), with
    at least SMs / group splits so that a wave spans one group of token blocks (see group_rows).
    """
    if device.type != "cuda":
        return 1 if n_row_blocks > 1 else min(2, n_tiles)  # exercise both paths on CPU
    forced = current(device).vocab_splits
    if forced is not None:
        return max(1, min(n_tiles, forced))
    return _best_splits(n_row_blocks, n_tiles, num_sms(_index(device)), group)


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
    forced = current(device).group_rows
    if forced is not None:
        return forced or 1 << 30
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


def workspace_dtype(cfg: KernelConfig, dtype: torch.dtype) -> torch.dtype:
    """16-bit workspaces in float32 in the interpreter (cfg.interpreter_f32_workspace)."""
    return torch.float32 if interpreting() and cfg.interpreter_f32_workspace else dtype


def use_tma(cfg: KernelConfig, *tensors) -> bool:
    """Whether the kernels may load these 2-D tensors through tensor descriptors (cfg.tma; None:
    Hopper or newer, or the interpreter): unit inner stride, 16-byte aligned base and row
    stride, no empty dimension (a descriptor's shape must be positive: an empty call, e.g.
    shift=True on one-token sequences, takes the pointer path, whose launchers skip empty
    grids)."""
    if cfg.tma is False:
        return False
    for t in tensors:
        if t.dim() != 2 or t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16 \
                or (t.stride(0) * t.element_size()) % 16:
            return False
    if cfg.tma or interpreting():
        return True
    t = tensors[0]
    return t.is_cuda and facts(t.device).tma


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (cached)."""
    return _capability(_index(device))


@functools.lru_cache(maxsize=None)
def _capability(device_index):
    # cached: the query took ~40 us of host time per launch
    return torch.cuda.get_device_capability(device_index)


def persistent_programs(n_tiles: int, device: torch.device, per_sm: int) -> int:
    """Programs of a dz kernel's persistent launch: ``per_sm`` per SM, 0 = one program per tile
    (no persistence); on the CPU a few, so that the tests walk the tile loop."""
    if device.type != "cuda":
        return max(1, min(n_tiles, 3))
    if per_sm <= 0:
        return n_tiles
    return max(1, min(n_tiles, per_sm * num_sms(_index(device))))
