"""Input validation of the public functions: every check and its message lives here.

Errors read "name: expected X, got Y". :func:`prepare` validates a head's tensors, applies
autocast and the shift, and flattens to (N, D); :func:`make_options` validates the scalar options
and bundles them, :func:`check_options` only validates them.
"""

from __future__ import annotations

import math

import torch

from .engine.options import AUTO_FILTER_EPS, IMPLS, REDUCTIONS, Options

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(what, expected, got):
    raise ValueError(f"{what}: expected {expected}, got {got}")


def check_real(name, value, lo=None, lo_open=False, hi=None):
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) floats may be symbolic.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < math.inf:
        fail(name, "a finite number", repr(value))
    if lo is not None and (value <= lo if lo_open else value < lo):
        fail(name, f"a number {'>' if lo_open else '>='} {lo}", repr(value))
    if hi is not None and value > hi:
        fail(name, f"a number <= {hi}", repr(value))
    return float(value)



def check_ce_weight(ce_weight, targets) -> float:
    """A distillation's CE-term weight in [0, 1]; a weight above 0 needs the targets it is on."""
    ce_weight = check_real("ce_weight", ce_weight, lo=0.0, hi=1.0)
    if ce_weight > 0.0 and targets is None:
        fail("targets", f"a tensor of class indices when ce_weight > 0 (ce_weight={ce_weight})",
             "None")
    return ce_weight

def _filter_eps(filter_eps, dtype):
    if filter_eps is None:
        return None
    if filter_eps == "auto":
        return AUTO_FILTER_EPS[str(dtype).removeprefix("torch.")]
    return check_real("filter_eps", filter_eps, lo=0.0, lo_open=True, hi=1.0)


def _memory_budget(budget):
    if budget is None or budget == "auto":
        return budget
    if isinstance(budget, str):
        fail("memory_budget", 'None, "auto" or a number >= 0', repr(budget))
    return check_real("memory_budget", budget, lo=0.0)


def truncation_settings(top_k, top_p, min_p):
    """A sampler's settings with the values that keep every token as None.

    top_p = 1.0 and min_p = 0.0 keep every token (vLLM's defaults), so they count as off: a
    call with only those runs the untruncated path, bit for bit.
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        fail("top_k", "None or a positive int (vLLM's -1 or 0, no top-k, is None here)",
             repr(top_k))
    if top_p is not None:
        top_p = check_real("top_p", top_p, lo=0.0, lo_open=True, hi=1.0)
        top_p = None if top_p == 1.0 else top_p
    if min_p is not None:
        min_p = check_real("min_p", min_p, lo=0.0, hi=1.0)
        min_p = None if min_p == 0.0 else min_p
    return top_k, top_p, min_p


def make_options(dtype, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None, logit_scale=1.0, temperature=1.0, filter_eps=None,
                 need_entropy=False, chunk_bytes=None,
                 memory_budget=None, lse_out=False, need_stats=False,
                 top_k=None, top_p=None, min_p=None) -> Options:
    """Validate scalar options and bundle them (``dtype`` resolves ``filter_eps="auto"``)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        fail("ignore_index", "an int", repr(ignore_index))
    if reduction not in REDUCTIONS:
        fail("reduction", f"one of {REDUCTIONS}", repr(reduction))
    if softcap is not None:
        softcap = check_real("softcap", softcap, lo=0.0, lo_open=True)
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                    or chunk_bytes < 1):
        fail("chunk_bytes", "None or a positive int", repr(chunk_bytes))
    top_k, top_p, min_p = truncation_settings(top_k, top_p, min_p)
    return Options(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=check_real("label_smoothing", label_smoothing, lo=0.0, hi=1.0),
        z_loss=check_real("z_loss", z_loss, lo=0.0),
        softcap=softcap,
        logit_scale=check_real("logit_scale", logit_scale, lo=0.0, lo_open=True),
        temperature=check_real("temperature", temperature, lo=0.0, lo_open=True),
        filter_eps=_filter_eps(filter_eps, dtype),
        need_entropy=bool(need_entropy),
        chunk_bytes=chunk_bytes,
        memory_budget=_memory_budget(memory_budget),
        lse_out=bool(lse_out),
        need_stats=bool(need_stats),
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
    )


def check_options(**options) -> None:
    """Validate scalar options (:func:`make_options`'s keywords) where nothing is computed yet:
    a module's construction, a patch's options; a bad one fails there, not at the first step."""
    make_options(torch.float32, **options)


def check_impl(impl) -> None:
    if impl not in IMPLS:
        fail("impl", f"one of {IMPLS}", repr(impl))


def autocast_dtype(t):
    """The dtype F.linear would compute ``t`` in: the autocast dtype if autocast is on for t's
    device and t is a floating tensor other than float64 (autocast leaves float64 alone)."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return None if t is None else t.dtype
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


def _autocast(hidden, weight, bias):
    """Cast as F.linear would under torch.autocast; then (as F.linear) demand one dtype."""
    hidden, weight = hidden.to(autocast_dtype(hidden)), weight.to(autocast_dtype(weight))
    bias = None if bias is None else bias.to(autocast_dtype(bias))
    if weight.dtype != hidden.dtype:
        fail("weight dtype", f"hidden's dtype {hidden.dtype} (or use torch.autocast)", weight.dtype)
    elif bias is not None and bias.dtype != hidden.dtype:
        fail("bias dtype", f"hidden's dtype {hidden.dtype}", bias.dtype)
    return hidden, weight, bias


def _check_tensors(hidden, weight, targets, bias, token_weights, shift, tname="targets"):
    # tname: the user's name of the targets argument (linear_log_probs calls it "tokens")
    for name, t in (("hidden", hidden), ("weight", weight), (tname, targets)):
        if not isinstance(t, torch.Tensor):
            fail(name, "a torch.Tensor", type(t).__name__)
    if hidden.dtype not in _FLOAT_DTYPES:
        fail("hidden dtype", "float16, bfloat16, float32 or float64", hidden.dtype)
    if hidden.dim() < (2 if shift else 1):
        fail("hidden", "shape (*, T, D) with shift=True" if shift else "shape (*, D)", tuple(hidden.shape))
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        fail("weight", f"shape (V, {hidden.shape[-1]}) with V >= 1", tuple(weight.shape))
    if targets.dtype not in (torch.int64, torch.int32):
        fail(f"{tname} dtype", "torch.int64 or torch.int32", targets.dtype)
    if targets.shape != hidden.shape[:-1]:
        fail(tname, f"shape {tuple(hidden.shape[:-1])} (hidden's without D)", tuple(targets.shape))
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        fail("bias", f"None or a tensor of shape ({weight.shape[0]},)",
             tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__)
    for name, t in (("weight", weight), (tname, targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            fail(f"{name} device", f"hidden's device {hidden.device}", t.device)
    if token_weights is not None:
        _check_per_token("token_weights", token_weights, targets, hidden, tname)


def _check_per_token(name, t, targets, hidden, tname):
    """A per-token float tensor (token weights, temperatures): targets' shape, hidden's device."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        fail(name, "None or a float tensor", getattr(t, "dtype", type(t)))
    if t.shape != targets.shape:
        fail(name, f"{tname}' shape {tuple(targets.shape)}", tuple(t.shape))
    if t.device != hidden.device:
        fail(f"{name} device", f"hidden's device {hidden.device}", t.device)


def _shifted_flat(t, shift):
    """A per-token tensor as the flat targets see it: with shift the value at position t + 1
    belongs to the token at t + 1, so it moves with the targets, then all is flattened."""
    if t is None:
        return None
    return (t[..., 1:] if shift else t).reshape(-1)


def _fail_targets(targets, vocab, ignore_index, tname="targets"):
    first = targets[(targets.clamp(0, vocab - 1) != targets) & (targets != ignore_index)][0].item()
    fail(tname, f"class indices in [0, {vocab}) or ignore_index={ignore_index}", f"{first}")


def check_flag(bad, targets, vocab, ignore_index, defer=False, tname="targets"):
    """Raise when the one-element 0/1 tensor ``bad`` is set (targets out of range; see
    :func:`defer_flag` for ``defer``). Kernels treat such targets as ignored."""
    return defer_flag(bad, lambda: _fail_targets(targets, vocab, ignore_index, tname), defer)


def defer_flag(bad, raise_bad, defer=False):
    """Call ``raise_bad`` when the one-element 0/1 tensor ``bad`` is set; with ``defer`` and a
    CUDA flag, return a function that does so instead, reading the flag (copied to pinned
    memory now) once the caller has queued its kernels: no host sync that idles the GPU during
    the call's Python (0.3-0.6 ms on the H200)."""
    if defer and bad.is_cuda:
        flag = torch.empty((), dtype=bad.dtype, pin_memory=True)
        flag.copy_(bad.reshape(()), non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def check():
            done.synchronize()  # waits for the flag only, not for the kernels queued after it
            if flag.item():
                raise_bad()
        return check
    if bool(bad.reshape(())):
        raise_bad()
    return None


def check_target_range(targets, vocab, ignore_index, defer=False, tname="targets"):
    """Raise for a target outside [0, V) that is not ignore_index (see check_flag for
    ``defer``; under torch.compile an async assert)."""
    bad = (targets.clamp(0, vocab - 1) != targets) & (targets != ignore_index)
    if torch.compiler.is_compiling():  # (before numel(): no guard on the token count)
        torch._assert_async(~bad.any(), f"cutce: {tname} outside [0, V) that are not ignore_index")
        return None
    return (check_flag(bad.any(), targets, vocab, ignore_index, defer, tname) if targets.numel()
            else None)


def prepare(hidden, weight, targets, bias, token_weights, shift, ignore_index, vocab=None,
            check_targets=True, tname="targets"):
    """Validate tensors, apply autocast and shift, flatten to (N, D). Returns the flat tensors,
    the output shape (targets' shape after shift) and the targets' range check to run once the
    kernels are queued (None when none is pending, see check_flag). ``vocab``: the global V
    that targets are checked against when ``weight`` is one rank's vocabulary slice (default:
    weight's rows). ``check_targets=False``: the caller checks the flat targets itself.
    ``tname``: the user's name of the targets argument, for error messages."""
    _check_tensors(hidden, weight, targets, bias, token_weights, shift, tname)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    w1 = _shifted_flat(token_weights, shift)
    if shift:
        hidden, targets = hidden[..., :-1, :], targets[..., 1:]
    check = None
    if check_targets:
        check = check_target_range(targets, weight.shape[0] if vocab is None else vocab,
                                   ignore_index, defer=True, tname=tname)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    return h2, weight, bias, targets.reshape(-1).long(), w1, targets.shape, check


def row_temperatures(temperature, targets, hidden, t1, shift, ignore_index, dtype, tname="targets"):
    """Per-token temperatures (a tensor of targets' shape, validated and shifted as token
    weights are, :func:`prepare`) as the backends take them: (inv, check) with inv (N,) ``dtype``
    = 1 / temperature at the flat targets ``t1``, 1 where t1 is ignore_index (whatever the
    temperature there: ignored rows still enter the backward's products, where 1 / 0 would make
    the weight's gradient NaN), and check the deferred test that the others are finite and > 0
    (see :func:`check_flag`; None when none is pending). No host sync."""
    _check_per_token("temperature", temperature, targets, hidden, tname)
    if temperature.requires_grad:
        fail("temperature", "a tensor that does not require grad (it is not differentiated)",
             "requires_grad=True")
    flat = _shifted_flat(temperature.detach(), shift)
    valid = t1 != ignore_index
    inv = 1.0 / flat.to(dtype)
    # (a subnormal temperature is > 0 but its inverse overflows: the logits would be inf)
    bad = valid & ~((flat > 0) & (flat < math.inf) & (inv < math.inf))
    inv = torch.where(valid, inv, 1.0)
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "cutce: temperature not finite and > 0 at a scored token")
        return inv, None
    if not flat.numel():
        return inv, None

    def first_bad():
        fail("temperature", f"finite values > 0 with a finite inverse in {dtype} where "
             f"{tname} != ignore_index", f"{flat[bad][0].item()}")
    return inv, defer_flag(bad.any(), first_bad, defer=True)
