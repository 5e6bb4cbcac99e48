"""Every Triton kernel compiles for each NVIDIA architecture the support page lists
(docs/support.md), as the GPU path launches it there (tools/gpu_compile.py: the preset the
target's facts give), within the target's shared memory, checked on a machine without a GPU:
the interpreter tests run no compiler passes, so a kernel that only fails to compile (or
overflows shared memory) on a GPU would otherwise first fail on the device, or on a user's.

sm_90 (H100/H200: descriptors, 227 KiB, the measured cards) runs by default; the others (1-3
minutes each on 2 CPU cores) are marked slow, which CI runs after the README's test command (that
must stay within 10 minutes): sm_80 compiles the pointer-load preset against 163 KiB, sm_86/sm_89
the same against 99 KiB, sm_100 the Hopper one through Triton's ptxas-blackwell, sm_120 the sm_80
one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from cutce.backends.triton import configs  # noqa: E402
from cutce.engine.device import TARGETS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = (90,)
ARCHS = [pytest.param(a, id=f"sm{a}", marks=() if a in DEFAULT else pytest.mark.slow)
         for a in sorted(TARGETS, key=lambda a: (a not in DEFAULT, a))]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the GPU tests compile and run them")
@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_for_the_gpu(tmp_path, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh compile, not a cached one
    out = tmp_path / "kernels.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_compile.py"),
                        "--arch", str(arch), "--json", str(out)], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    kernels = json.loads(out.read_text())
    names = {(k["module"], k["kernel"]) for k in kernels}
    # every kernel of the package, compiled at least once
    assert names == {("forward", "_forward_kernel"), ("forward", "_target_kernel"),
                     ("backward", "_dz_kernel"), ("kept", "_kept_dz_kernel"),
                     ("fused", "_fused_logits_kernel"),
                     ("fused", "_chunk_epilogue_kernel"), ("fused_soft", "_soft_entries_kernel"),
                     ("elementwise", "_cast_scale_kernel"),
                     ("elementwise", "_row_scale_kernel"),
                     ("rows", "_row_coefs_kernel"), ("distill", "_fwd_kernel"),
                     ("distill_backward", "_dz_kernel"), ("distill_fused", "_stats_kernel"),
                     ("distill_dz", "_dz_kernel"), ("distill_dz", "_dz_ew_kernel")}, names
    # the preset's recorded need, which decides it for parts no one compiled for, holds here
    facts = TARGETS[arch][0]
    cfg = configs.preset_for(facts)
    need = next(n for c, n, _ in configs.PRESETS if c is cfg)
    largest = max(k["shared"] for k in kernels)
    assert largest <= need <= facts.shared_memory, (arch, largest, need, facts.shared_memory)
