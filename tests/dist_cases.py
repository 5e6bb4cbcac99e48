"""The distributed tests' shapes, class weights and inputs (the same on every rank)."""

from __future__ import annotations

import torch

B, T, D, V = 2, 6, 8, 37
CW = torch.linspace(0.2, 2.0, V, dtype=torch.float64)


def _inputs(case, seed=0):
    """Full (unsplit) float64 inputs, identical on every rank (same seed)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(V, generator=g, dtype=torch.float64) if case.get("bias") else None
    t = torch.randint(0, V, (B, T), generator=g)
    pattern = case.get("targets")
    if pattern == "one_rank":  # all targets inside one rank's slice (world3 rank 1, world2 rank 0)
        t = torch.randint(9, 23, (B, T), generator=g)
    t[0, 2] = t[1, 4] = case.get("ignore_index", -100)
    if pattern == "all_ignored":
        t.fill_(case.get("ignore_index", -100))
    tw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5 if case.get("token_weights") else None
    g_loss = torch.randn(B, T, generator=g, dtype=torch.float64)  # upstream gradient for "none"
    g_lse = torch.randn(B, T, generator=g, dtype=torch.float64)
    return h, w, b, t, tw, g_loss, g_lse
