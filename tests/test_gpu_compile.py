"""Every Triton kernel compiles for Hopper (sm_90, tensor descriptors) and Ampere (sm_80) as the
GPU path launches it (tools/gpu_compile.py), checked on a machine without a GPU: the
interpreter tests run no compiler passes, so a kernel that only fails to compile (or overflows
shared memory) on a GPU would otherwise first fail on the device, or on a user's A100."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the GPU tests compile and run them")
@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
def test_every_kernel_compiles_for_the_gpu(tmp_path, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh compile, not a cached one
    out = tmp_path / "kernels.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_compile.py"),
                        "--arch", str(arch), "--json", str(out)], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = {(k["module"], k["kernel"]) for k in json.loads(out.read_text())}
    # every kernel of the package, compiled at least once
    assert names == {("forward", "_forward_kernel"), ("forward", "_target_kernel"),
                     ("backward", "_dz_kernel"), ("kept", "_kept_dz_kernel"),
                     ("fused", "_fused_logits_kernel"),
                     ("fused", "_chunk_epilogue_kernel"), ("fused", "_cast_scale_kernel"),
                     ("fused", "_row_scale_kernel"),
                     ("rows", "_row_coefs_kernel"), ("distill", "_fwd_kernel"),
                     ("distill", "_dz_kernel"), ("distill_fused", "_stats_kernel"),
                     ("distill_dz", "_dz_kernel"), ("distill_dz", "_dz_ew_kernel")}, names
