"""Compile every Triton kernel as the GPU path launches it, for one NVIDIA architecture, without
a GPU.

CI has no GPU and time on one is scarce: a kernel that Triton cannot compile
for the GPU (the interpreter runs no compiler passes), or whose pipeline stages overflow the
shared memory of the parts it serves, should fail here, not in the first device call or on a
user's machine. The launchers run on CPU tensors with the GPU's choices (TMA descriptors where
the preset uses them, flattened loops, GPU tiles); each launch is compiled by Triton's own
``compile`` for the target and not run (the launchers' torch code then works on uninitialized
buffers, which is fine: only the compiled kernels are checked).

    python tools/gpu_compile.py [--arch 80|86|89|90|100|120] [--json OUT] [--spills]
    # TRITON_INTERPRET unset

The targets and their facts are cutce.engine.device.TARGETS; each compiles with the preset its
facts give (cutce.backends.triton.configs.preset_for: HOPPER on sm_90/sm_100, PRE_HOPPER on
sm_80/86/89/120). Prints one line per compiled kernel variant (name, shared memory bytes,
stages, warps), then the largest against the target's limit, and exits 1 when one needs more
shared memory than a block may use there (227 KiB on sm_90/sm_100, 163 KiB on sm_80, 99 KiB on
sm_86/89/120). Triton's bundled ptxas compiles sm_80-sm_90, its ptxas-blackwell sm_100 and
sm_120. Takes 2-6 minutes per architecture on 2 busy CPU cores (docs/support.md);
tests/test_gpu_compile.py runs sm_90 and sm_80 by default and the others as slow tests.

--spills also reads each cubin's registers and local-memory spills (cuobjdump, shipped with
Triton): a tile whose epilogue spills is worth measuring against a smaller one on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("gpu_compile.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ARCH = 90  # the target of this run (--arch)
_VARIANT_KEYS = ("MODE", "PASS", "REFILL", "SOFTCAP", "CAP_S", "TILE_STORE", "STORE_S", "BLOCK_N",
                 "BLOCK_V", "BLOCK_K")  # the constexprs printed per compiled variant


class _HopperWithoutGPU:
    """What JITFunction.run asks of the driver before it compiles."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def is_active(self):
        return True


def _spills(kernel):
    """(registers, stack bytes, spill stores, spill loads) of a compiled kernel's cubin."""
    import re
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return (int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1,
            len(re.findall(r"\bSTL(\.\w+)*\s", sass)), len(re.findall(r"\bLDL(\.\w+)*\s", sass)))


def _install(record):
    driver.set_active(_HopperWithoutGPU())
    real_run = JITFunction.run

    seen = set()

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        if id(kernel) in seen:  # a launch of an already compiled variant
            return kernel
        seen.add(id(kernel))
        consts = {k: v for k, v in kwargs.items() if k.isupper()}
        record.append(dict(kernel=self.fn.__name__, module=self.fn.__module__.rsplit(".", 1)[-1],
                           shared=kernel.metadata.shared, stages=kernel.metadata.num_stages,
                           warps=kernel.metadata.num_warps, _compiled=kernel,
                           variant=",".join(f"{k}={v}" for k, v in consts.items()
                                            if k in _VARIANT_KEYS)))
        return kernel

    JITFunction.run = compile_only


def _facts():
    from cutce.engine.device import TARGETS
    return TARGETS[ARCH][0]


def _gpu_config():
    """The preset the target's facts give, with the descriptor path forced where it has TMA: the
    inputs here are CPU tensors, for which the preset's tma=None would mean pointer loads."""
    from cutce.backends.triton import configs
    cfg = configs.preset_for(_facts())
    return dataclasses.replace(cfg, tma=True) if _facts().tma and cfg.tma is not False else cfg


def _inputs(n, d, v, dtype, gen, bias=False):
    h = torch.randn(n, d, generator=gen).to(dtype)
    w = torch.randn(v, d, generator=gen).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    return h, w, b, t


def run_all():
    from cutce.backends.triton import (backward, configs, distill, distill_backward,
                                       distill_fused, elementwise, forward, fused, kept, rows)
    from cutce.engine import planner
    from cutce.engine.problem import Problem
    gen = torch.Generator().manual_seed(0)
    f32 = dict(dtype=torch.float32)
    # the loss: recompute forward and backward, the fused strategy, the small kernels
    for dtype, d, softcap, bias in ((torch.bfloat16, 256, 0.0, False),
                                    (torch.bfloat16, 200, 30.0, True),
                                    (torch.float32, 256, 0.0, False),
                                    (torch.float16, 256, 30.0, False)):
        h, w, b, t = _inputs(300, d, 1000, dtype, gen, bias)
        n = h.shape[0]
        lse, _, _, pz, ub = forward.forward(h, w, b, t, 1.0, softcap, 1.0, True, True, bound=True)
        forward.forward(h, w, b, t, 1.0, softcap, 0.7, True, True, need_stats=True)  # RL metrics
        forward.target_logits(h, w, b, t, 1.0, softcap, 1.0)
        keep = kept.buffer(n, 1000, dtype, h.device)  # the strategy "keep": its store, its dz pass
        forward.forward(h, w, b, t, 1.0, softcap, 0.7, True, True, keep=keep)
        g = torch.ones(n, **f32)
        kept.backward(keep, h, w, b, t, lse, lse, pz, g, -g, g, g, 1.0, softcap, 0.7, True,
                      True, True, True, b is not None, class_weight=torch.ones(1000, **f32))
        g = torch.ones(n, **f32)
        recompute = planner.recompute_plan(Problem(n, 1000, d, dtype, True, True), "triton")
        for eps in (0.0, 1e-3):
            backward.backward(h, w, b, t, lse, pz, ub if eps else ub[:0], g, -g, g, g, 1.0,
                              softcap, 1.0, True,
                              True, eps, True, True, bias, recompute)
        coef = torch.ones(4, n, **f32)
        for store in (False, True) if dtype != torch.float16 else ():  # (not fused: see plan)
            with configs.override(loss_tile_store=store):
                # the soft targets of the sparse distillation with the tile stores
                ids = torch.randperm(1000, generator=gen)[:5].repeat(n, 1) if store else None
                a = None if ids is None else torch.full((n, 5), 0.1, **f32)
                fused.fused_loss(h, w, b, t, coef, 1.0, softcap, 128, dtype != torch.float32,
                                 True, True, bias, ids, a)
    rows.row_coefs(t, torch.rand(n), 1000, -100, 0.01, True)
    x = torch.empty(4096)
    elementwise._cast_scale_kernel[(1,)](
        src_ptr=x,
        dst_ptr=x.to(torch.bfloat16),
        g_ptr=x,
        n=4096,
        HAS_G=True,
        BLOCK=4096,
        num_warps=8,
    )
    # distillation: recompute kernels (every mode) and the fused strategy (forward KL, JSD)
    hs, ws, bs, t = _inputs(300, 96, 1000, torch.bfloat16, gen, True)
    ht, wt, bt, _ = _inputs(300, 256, 1000, torch.bfloat16, gen)
    for mode, beta in ((distill.FWD_KL, 0.0), (distill.JSD, 0.5), (distill.REV_KL, 1.0)):
        for bulk in (False, True):  # the recompute kernels' pointer and bulk loads
            with configs.override(distill_recompute_tma=bulk):
                stats, *_ = distill.forward(hs, ws, bs, ht, wt, bt, t, mode, beta, 2.0, 0.0,
                                            0.0, True)
                distill_backward.backward(hs, ws, bs, ht, wt, bt, t, stats,
                                          torch.ones(300, **f32), mode, beta, 2.0, 0.0, 0.0, 0.1,
                                          (True, True, True, False, False, False))
        # with the student's Xs stored too (no CE term: ce_weight 0), bulk and pointer stores
        for store, xs in ((False, False), (True, False), (False, True), (True, True)) \
                if mode != distill.REV_KL else ():
            with configs.override(distill_tile_store=store, distill_student_x=xs):
                distill_fused.fused_total(hs, ws, bs, ht, wt, bt, t, torch.ones(300, **f32),
                                          mode, beta, 2.0, 0.0, 0.0, 0.0 if xs else 0.1, 128,
                                          False, xs, True, True, True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None, help="write the compiled variants here")
    ap.add_argument("--spills", action="store_true", help="registers and spills per variant")
    from cutce.engine.device import TARGETS
    ap.add_argument("--arch", type=int, choices=sorted(TARGETS), default=90,
                    help="compute capability x10: " + "; ".join(
                        f"{a} ({parts})" for a, (_, parts) in sorted(TARGETS.items())))
    args = ap.parse_args()
    global ARCH
    ARCH = args.arch
    record = []
    _install(record)
    from cutce.backends.triton import configs
    with configs.override(_gpu_config()):
        run_all()
    limit = _facts().shared_memory
    over = [r for r in record if r["shared"] > limit]
    cfg = configs.preset_for(_facts())
    name = next(n for n in ("HOPPER", "PRE_HOPPER", *dir(configs)) if getattr(configs, n) is cfg)
    for r in record:
        kernel = r.pop("_compiled")
        if args.spills:
            r["regs"], r["stack"], r["spill_stores"], r["spill_loads"] = _spills(kernel)
        extra = (f", {r['regs']} regs, {r['stack']} B stack, {r['spill_stores']}/"
                 f"{r['spill_loads']} spill st/ld" if args.spills else "")
        print(f"{r['module']}.{r['kernel']} [{r['variant']}]: {r['shared']} B shared, "
              f"{r['stages']} stages, {r['warps']} warps{extra}"
              f"{'  OVER THE LIMIT' if r in over else ''}")
    top = max(record, key=lambda r: r["shared"], default=None)
    if top is not None:
        print(f"sm_{ARCH} ({TARGETS[ARCH][1]}): preset {name}, largest kernel "
              f"{top['module']}.{top['kernel']} {top['shared']} B of the {limit} B a block may use")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f)
    sys.exit(1 if over or not record else 0)


if __name__ == "__main__":
    main()
