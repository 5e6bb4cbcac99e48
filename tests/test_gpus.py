"""Which GPUs the kernels serve (docs/support.md): the preset from a device's facts, the backend
choice on AMD and pre-Ampere GPUs. The devices here are faked (torch's device queries
monkeypatched)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

pytest.importorskip("triton")

from cutce import api, backends  # noqa: E402
from cutce.backends.triton import configs  # noqa: E402
from cutce.engine import device as gpu  # noqa: E402

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
    # a part below every preset's need takes the smallest
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
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in seen if "cutce" in str(w.message)]
    backends.warn_torch_fallback.cache_clear()


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
