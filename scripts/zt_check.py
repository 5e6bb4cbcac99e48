"""Target logit from the forward's epilogue vs the separate target kernel: equality, loss
error against float32, forward time. PYTHONPATH=src python scripts/zt_check.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import cutce  # noqa: E402
from cutce.triton import configs  # noqa: E402
from cutce.triton import forward as tfwd  # noqa: E402
from gpu_check import SHAPES, make_data, rel, timeit  # noqa: E402

for name in ("gemma2-2b", "llama3-8b"):
    n, d, v = SHAPES[name]
    h, w, t = make_data("zipf", n, d, v, torch.bfloat16)
    ref = cutce.linear_cross_entropy(h.float(), w.float(), t, impl="torch", chunk_bytes=2**30)
    out = {}
    for flag in (True, False):
        configs.ZT_IN_KERNEL = flag
        zt = tfwd.forward(h, w, None, t, 1.0, 0.0, 1.0, False, False)[1]
        with torch.no_grad():
            loss = cutce.linear_cross_entropy(h, w, t, impl="triton")
            ms = timeit(lambda: cutce.linear_cross_entropy(h, w, t, impl="triton"))
        out[flag] = zt
        print(f"{name} zt_in_kernel={flag}: loss err {rel(loss, ref):.2e} fwd {ms:.2f} ms", flush=True)
    eq = (out[True] == out[False]).float().mean().item()
    print(f"{name}: zt equal in {eq:.1%} of rows, max |diff| {(out[True] - out[False]).abs().max():.2e}")
