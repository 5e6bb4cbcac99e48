"""Which GPUs the kernels serve (docs/support.md): the preset from a device's facts. The devices
here are faked (torch's device queries monkeypatched)."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")

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
