"""Which GPUs the kernels serve (docs/support.md): the preset from a device's facts, the backend
choice on AMD and pre-Ampere GPUs, and a kernel that does not fit its GPU (smaller tiles, then,
under impl="auto", the torch path), forced through a launch that raises Triton's
OutOfResources above a tile size. The devices here are faked (torch's device queries
monkeypatched); the kernels run in the interpreter, or on the GPU where there is one."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

pytest.importorskip("triton")

import cutce  # noqa: E402
from cutce import api, backends  # noqa: E402
from cutce.backends.triton import configs, fit  # noqa: E402
from cutce.backends.triton import forward as tfwd  # noqa: E402
from cutce.engine import device as gpu  # noqa: E402
from distill_cases import check as distill_check  # noqa: E402
from distill_cases import make as distill_make  # noqa: E402
from distill_cases import to_dev as distill_to_dev  # noqa: E402
from reference import make_inputs, oracle, rel_err  # noqa: E402
from triton_cases import compare, to_dev  # noqa: E402
from triton_support import DEV  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

# The presets each compile-checked architecture gets: the measured ones exactly (by identity)
EXPECTED = {80: configs.PRE_HOPPER, 86: configs.PRE_HOPPER, 89: configs.PRE_HOPPER,
            90: configs.HOPPER, 100: configs.HOPPER, 120: configs.PRE_HOPPER}


def test_preset_follows_the_device_facts():
    assert set(EXPECTED) == set(gpu.TARGETS)
    for arch, (facts, _) in gpu.TARGETS.items():
        assert configs.preset_for(facts) is EXPECTED[arch], arch
    hopper_memory = gpu.TARGETS[90][0].shared_memory
    # the shared memory decides, not the major version: sm_120 is newer than sm_90
    assert gpu.TARGETS[120][0].tma and configs.preset_for(gpu.TARGETS[120][0]) is configs.PRE_HOPPER
    no_tma = gpu.DeviceFacts((9, 0), hopper_memory, False)
    assert configs.preset_for(no_tma) is configs.PRE_HOPPER
    # a part below every preset's need takes the smallest, and fit.py shrinks it at the launch
    assert configs.preset_for(gpu.DeviceFacts((8, 7), 65536, False)) is configs.PRE_HOPPER


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(major, minor, name, **props): torch's device queries answer for one CUDA device
    (cuda:0) with these properties; returns the list of queries made."""
    queries = []

    def install(major, minor, name="", **props):
        p = types.SimpleNamespace(major=major, minor=minor, name=name, **props)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: queries.append(i) or p)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        gpu._facts.cache_clear()
        return queries
    yield install
    gpu._facts.cache_clear()


def test_preset_reads_the_device_once(fake_gpu, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    queries = fake_gpu(12, 0, "NVIDIA GeForce RTX 5090", shared_memory_per_block_optin=101376)
    assert configs.preset("cuda:0") is configs.PRE_HOPPER
    assert configs.preset(torch.device("cuda")) is configs.PRE_HOPPER
    assert queries == [0]
    fake_gpu(9, 0, "NVIDIA H100 80GB HBM3", shared_memory_per_block_optin=232448)
    assert configs.preset("cuda:0") is configs.HOPPER
    fake_gpu(10, 0, "NVIDIA B200")  # a torch that does not report it: the table's
    assert gpu.facts(torch.device("cuda:0")).shared_memory == 232448
    assert configs.preset("cuda:0") is configs.HOPPER


@pytest.fixture
def notices():
    """The cutce warnings a block emits (every one recorded; the once-only ones reset)."""
    backends.warn_torch_fallback.cache_clear()
    fit._WARNED.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in seen if "cutce" in str(w.message)]
    backends.warn_torch_fallback.cache_clear()
    fit._WARNED.clear()


def _cuda_hidden(dtype=torch.bfloat16):
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda:0"))


@pytest.mark.parametrize("kind", ["loss", "distill"])
def test_amd_gpu_takes_the_torch_path(fake_gpu, monkeypatch, notices, kind):
    """A ROCm build's tensors are "cuda" ones; the kernels' descriptors and tiles are NVIDIA's:
    impl="auto" runs the exact torch path and says so once, impl="triton" raises."""
    monkeypatch.setattr(torch.version, "hip", "6.2.41133", raising=False)
    fake_gpu(9, 4, "AMD Instinct MI300X", shared_memory_per_block=65536)
    h = _cuda_hidden()
    for _ in range(3):
        assert api.choose_backend("auto", h, kind, teacher=h) == "torch"
    assert len(notices()) == 1 and "got an AMD GPU (ROCm 6.2.41133" in notices()[0]
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot run: .*expect an NVIDIA GPU.*"
                                           r"got an AMD GPU .*MI300X"):
        api.choose_backend("triton", h, kind, teacher=h)
    # a call the kernels would not cover anyway says nothing more
    assert api.choose_backend("auto", _cuda_hidden(torch.float64)) == "torch"
    assert len(notices()) == 1


def test_pre_ampere_gpu_takes_the_torch_path(fake_gpu, monkeypatch, notices):
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    fake_gpu(7, 5, "Tesla T4", shared_memory_per_block_optin=65536)
    assert api.choose_backend("auto", _cuda_hidden()) == "torch"
    assert len(notices()) == 1 and "got 7.5 (Tesla T4)" in notices()[0]
    with pytest.raises(RuntimeError, match=r"compute capability 8\.0 or newer, got 7\.5"):
        api.choose_backend("triton", _cuda_hidden())


def test_smaller_steps_down_to_the_floor():
    for start in (configs.HOPPER, configs.PRE_HOPPER, configs.INTERPRETER):
        cfg, steps = start, 0
        while (nxt := fit.smaller(cfg)) is not None:
            for name in fit.GEMM_TILES:
                a, b = getattr(cfg, name), getattr(nxt, name)
                if a is not None:  # every tile shrinks or stays; a dot's sides stay >= 16
                    assert (b.block_n * b.block_v * b.block_k * b.num_stages
                            <= a.block_n * a.block_v * a.block_k * a.num_stages)
                    assert min(b.block_n, b.block_v, b.block_k) >= 16
            cfg, steps = nxt, steps + 1
        assert steps <= 16
        assert {getattr(cfg, n) for n in fit.GEMM_TILES} <= {configs.MINIMAL_TILE, None}


@pytest.fixture
def launch_limit(monkeypatch):
    """launch_limit(block_v): every launch of a matrix kernel (one with a BLOCK_K: the operand
    tiles that take shared memory) with a BLOCK_V above it (0: any) raises OutOfResources, as
    Triton does at the launch of a kernel that needs more shared memory than the device has."""
    cls = type(tfwd._forward_kernel)  # JITFunction on a GPU, InterpretedFunction in the interpreter
    real = cls.run
    launched = []

    def install(block_v):
        def run(self, *args, grid, warmup, **kwargs):
            bv = kwargs.get("BLOCK_V")
            too_big = "BLOCK_K" in kwargs and (block_v == 0 or (bv or 0) > block_v)
            if too_big:
                raise OutOfResources(4096 * (bv or 1), 4096 * max(block_v, 1), "shared memory")
            if "BLOCK_K" in kwargs:
                launched.append(bv)
            return real(self, *args, grid=grid, warmup=warmup, **kwargs)
        monkeypatch.setattr(cls, "run", run)
        return launched
    return install


LIMIT_V = 16 if DEV == "cpu" else 32  # below every tile of the preset: the interpreter's, the GPU's (float32 ones are 64 wide)


@pytest.mark.parametrize("opts", [dict(reduction="none", softcap=3.0), dict()],
                         ids=["recompute", "fused"])
def test_loss_runs_with_smaller_tiles(gen, launch_limit, notices, opts):
    launched = launch_limit(LIMIT_V)
    h, w, t, b, tw = make_inputs(gen, 37, 29, 101, torch.float32, bias=True, ignore_frac=0.2)
    h, w, t, b, tw = to_dev(DEV, h, w, t, b, tw)
    compare(h, w, t, b, tw, opts, with_lse=True)  # impl="triton", forward and backward
    assert launched and max(v for v in launched if v is not None) <= LIMIT_V
    assert len(notices()) == 1 and "smaller tiles" in notices()[0], notices()


def test_distillation_runs_with_smaller_tiles(gen, launch_limit, notices):
    launch_limit(LIMIT_V)
    tensors = distill_to_dev(DEV, distill_make(gen, bias=True))
    distill_check(gen, tensors, torch.float32, impl="triton", beta=0.5, temperature=1.5)
    assert len(notices()) == 1 and "smaller tiles" in notices()[0], notices()


def _triton_under_auto(monkeypatch):
    # impl="auto" takes the kernels only for CUDA tensors: here it takes them for any
    monkeypatch.setattr(api, "choose_backend",
                        lambda impl, *a, **k: "torch" if impl == "torch" else "triton")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_no_tile_fits_auto_runs_the_torch_path(gen, launch_limit, notices, monkeypatch, reduction):
    _triton_under_auto(monkeypatch)
    launch_limit(0)
    h, w, t, b, _ = make_inputs(gen, 37, 29, 101, torch.float32, bias=True, ignore_frac=0.2)
    h, w, t, b = to_dev(DEV, h, w, t, b)
    loss = cutce.linear_cross_entropy(h, w, t, b, reduction=reduction, impl="auto")
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    ref = oracle(h64, w64, t, b64, reduction=reduction)[0]
    g = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.device)
    got = torch.autograd.grad((loss.double() * g).sum(), (h, w, b))
    want = torch.autograd.grad((ref * g).sum(), (h64, w64, b64))
    assert rel_err(loss, ref) < 2e-5
    for a, r in zip(got, want):
        assert rel_err(a, r) < 2e-5
    assert len(notices()) == 1, notices()
    assert "impl='auto' runs the torch path" in notices()[0] and "do not fit" in notices()[0]
    with pytest.raises(backends.KernelResourceError, match=r"expected a kernel within its "
                                                           r"limits .*got out of resource"):
        cutce.linear_cross_entropy(h, w, t, b, reduction=reduction, impl="triton")


def test_no_tile_fits_auto_distillation_runs_the_torch_path(gen, launch_limit, notices,
                                                             monkeypatch):
    _triton_under_auto(monkeypatch)
    launch_limit(0)
    tensors = distill_to_dev(DEV, distill_make(gen))
    distill_check(gen, tensors, torch.float32, impl="auto", beta=0.0)
    assert len(notices()) == 1 and "torch path" in notices()[0], notices()
    with pytest.raises(backends.KernelResourceError):
        distill_check(gen, tensors, torch.float32, impl="triton", beta=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_floor_tile_matches_the_oracle(gen, kernel_config, dtype):
    """The last step of the ladder (MINIMAL_TILE for every matrix tile) is a working tile
    wherever the kernels run, descriptor loads and bulk stores included."""
    kernel_config(**{name: configs.MINIMAL_TILE for name in fit.GEMM_TILES})
    h, w, t, b, tw = make_inputs(gen, 37, 29, 101, dtype, bias=True, ignore_frac=0.2)
    h, w, t, b, tw = to_dev(DEV, h, w, t, b, tw)
    compare(h, w, t, b, tw, dict(reduction="none", softcap=3.0), with_lse=True)
    compare(h, w, t, b, tw, dict())
    tensors = distill_to_dev(DEV, distill_make(gen, bias=True, dtype=dtype))
    distill_check(gen, tensors, dtype, impl="triton", beta=0.5)
