"""The loss's Triton path against the float64 oracle, its error measured against PyTorch's own
low-precision path's: the comparison the Triton tests share."""

from __future__ import annotations

import torch

import cutce
from reference import lowp_torch, make_inputs, oracle, rel_err
from triton_support import DEV


def to_dev(dev, *ts):
    return [None if t is None else (t.detach().to(dev).requires_grad_(t.requires_grad)
                                    if t.is_floating_point() else t.to(dev)) for t in ts]


def _run(fn, h, w, b, with_lse):
    loss, lse = fn(h, w, b)
    g_out = torch.randn_like(loss) if loss.dim() else torch.ones_like(loss)
    total = (loss * g_out).sum() + (0.3 * lse.sum() if with_lse else 0.0)
    params = [t for t in (h, w, b) if t is not None]
    return [loss, lse, *torch.autograd.grad(total, params)], g_out


# Loss option sets the Triton tests run through compare(), one strategy each.
OPTION_SETS = {
    "plain": dict(),
    "bias_scale_softcap": dict(logit_scale=0.8, softcap=3.0),
    "smoothing_zloss": dict(label_smoothing=0.1, z_loss=1e-3),
    "sum_ignore": dict(reduction="sum", ignore_index=-1),
    "none_all": dict(reduction="none", label_smoothing=0.2, z_loss=1e-2, softcap=5.0, logit_scale=1.3),
}


def compare_option_set(gen, dtype, name):
    """One of OPTION_SETS at a small ragged shape (37 x 29 x 101), through compare()."""
    opts = OPTION_SETS[name]
    h, w, t, b, tw = make_inputs(gen, 37, 29, 101, dtype, bias=name != "plain",
                                 token_weights=name in ("sum_ignore", "none_all"),
                                 ignore_frac=0.2, ignore_index=opts.get("ignore_index", -100))
    h, w, t, b, tw = to_dev(DEV, h, w, t, b, tw)
    compare(h, w, t, b, tw, opts, with_lse=name in ("plain", "none_all"))


def compare(h, w, t, b, tw, opts, with_lse=False, factor=1.5, floor=None):
    """cutce(impl='triton') vs oracle, against lowp_torch vs oracle, same upstream gradients."""
    dt = h.dtype
    floor = floor if floor is not None else {torch.float32: 2e-5, torch.float16: 2e-3,
                                             torch.bfloat16: 1e-2}[dt]
    torch.manual_seed(0)
    got, g = _run(lambda a, c, d: cutce.linear_cross_entropy(
        a, c, t, d, token_weights=tw, return_lse=True, impl="triton", **opts), h, w, b, with_lse)
    h64, w64, b64 = [None if x is None else x.detach().double().requires_grad_() for x in (h, w, b)]

    def ref_fn(fn, a, c, d):
        return fn(a, c, t, d, token_weights=tw, **opts)

    def grads_with(fn, a, c, d):
        loss, lse = ref_fn(fn, a, c, d)
        total = (loss * g.to(loss.dtype)).sum() + (0.3 * lse.sum() if with_lse else 0.0)
        return [loss, lse, *torch.autograd.grad(total, [x for x in (a, c, d) if x is not None])]

    want = grads_with(oracle, h64, w64, b64)
    hl, wl, bl = [None if x is None else x.detach().clone().requires_grad_() for x in (h, w, b)]
    lowp = grads_with(lowp_torch, hl, wl, bl)
    names = ["loss", "lse", "dE", "dC", "dbias"]
    for name, a, lp, ref in zip(names, got, lowp, want):
        assert torch.isfinite(a).all(), f"{name} has non-finite entries"
        err, base = rel_err(a, ref), rel_err(lp, ref)
        assert err <= factor * base + floor, f"{name}: error {err:.3g} vs torch {dt} {base:.3g}"
