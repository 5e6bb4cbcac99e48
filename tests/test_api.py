"""The public boundary: validation messages, empty input, autocast, the Module form, impl dispatch."""

from __future__ import annotations

import re

import pytest
import torch

import cutce
from cutce import LinearCrossEntropyLoss, linear_cross_entropy
from reference import lowp_torch, make_inputs, oracle, rel_err

N, D, V = 11, 8, 13


@pytest.fixture
def inputs(gen):
    h, w, t, b, tw = make_inputs(gen, N, D, V, bias=True, token_weights=True, requires_grad=False)
    return dict(hidden=h, weight=w, targets=t, bias=b, token_weights=tw)


def _call(inputs, **changes):
    kw = {**inputs, **changes}
    return linear_cross_entropy(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


# (what to change, regex the message must match). Every message reads "<what>: expected X, got Y".
BAD_TENSORS = {
    "hidden_list": (lambda i: dict(hidden=i["hidden"].tolist()), r"hidden: expected a torch.Tensor, got list"),
    "hidden_int": (lambda i: dict(hidden=i["hidden"].long()), r"hidden dtype: expected .*float.*got torch.int64"),
    "hidden_0d": (lambda i: dict(hidden=torch.tensor(1.0), targets=torch.tensor(0)), r"hidden: expected shape \(\*, D\), got \(\)"),
    "weight_wrong_d": (lambda i: dict(weight=i["weight"][:, :-1]), r"weight: expected shape \(V, 8\).*got \(13, 7\)"),
    "weight_1d": (lambda i: dict(weight=i["weight"][0]), r"weight: expected shape \(V, 8\).*got \(8,\)"),
    "weight_empty_vocab": (lambda i: dict(weight=i["weight"][:0], bias=None), r"weight: expected .*V >= 1, got \(0, 8\)"),
    "weight_not_tensor": (lambda i: dict(weight=None), r"weight: expected a torch.Tensor, got NoneType"),
    "weight_dtype": (lambda i: dict(weight=i["weight"].half()), r"weight dtype: expected hidden's dtype torch.float32.*got torch.float16"),
    "weight_int": (lambda i: dict(weight=i["weight"].long()), r"weight dtype: expected .*got torch.int64"),
    "weight_device": (lambda i: dict(weight=i["weight"].to("meta")), r"weight device: expected hidden's device cpu, got meta"),
    "bias_dtype": (lambda i: dict(bias=i["bias"].double()), r"bias dtype: expected hidden's dtype torch.float32, got torch.float64"),
    "bias_shape": (lambda i: dict(bias=i["bias"][:-1]), r"bias: expected None or a tensor of shape \(13,\), got \(12,\)"),
    "bias_2d": (lambda i: dict(bias=i["bias"][None]), r"bias: expected .*\(13,\), got \(1, 13\)"),
    "bias_list": (lambda i: dict(bias=[0.0] * V), r"bias: expected .*got list"),
    "targets_float": (lambda i: dict(targets=i["targets"].float()), r"targets dtype: expected torch.int64 or torch.int32, got torch.float32"),
    "targets_int16": (lambda i: dict(targets=i["targets"].short()), r"targets dtype: expected .*got torch.int16"),
    "targets_shape": (lambda i: dict(targets=i["targets"][:-1]), r"targets: expected shape \(11,\).*got \(10,\)"),
    "targets_2d": (lambda i: dict(targets=i["targets"][None]), r"targets: expected shape \(11,\).*got \(1, 11\)"),
    "targets_device": (lambda i: dict(targets=i["targets"].to("meta")), r"targets device: expected hidden's device cpu, got meta"),
    "tw_int": (lambda i: dict(token_weights=torch.ones(N, dtype=torch.long)), r"token_weights: expected None or a float tensor, got torch.int64"),
    "tw_shape": (lambda i: dict(token_weights=i["token_weights"][:-1]), r"token_weights: expected targets' shape \(11,\), got \(10,\)"),
    "tw_list": (lambda i: dict(token_weights=[1.0] * N), r"token_weights: expected None or a float tensor, got"),
    "shift_1d": (lambda i: dict(hidden=i["hidden"][0], targets=i["targets"][0], token_weights=None, shift=True), r"hidden: expected shape \(\*, T, D\) with shift=True, got \(8,\)"),
}

BAD_OPTIONS = {
    "reduction": (dict(reduction="avg"), r"reduction: expected one of \('mean', 'sum', 'none'\), got 'avg'"),
    "ls_neg": (dict(label_smoothing=-0.1), r"label_smoothing: expected a number >= 0.0, got -0.1"),
    "ls_big": (dict(label_smoothing=1.5), r"label_smoothing: expected a number <= 1.0, got 1.5"),
    "ls_nan": (dict(label_smoothing=float("nan")), r"label_smoothing: expected a finite number, got nan"),
    "ls_str": (dict(label_smoothing="0.1"), r"label_smoothing: expected a finite number, got '0.1'"),
    "ls_tensor": (dict(label_smoothing=torch.tensor(0.1)), r"label_smoothing: expected a finite number, got tensor"),
    "zloss_neg": (dict(z_loss=-1e-4), r"z_loss: expected a number >= 0.0, got -0.0001"),
    "zloss_inf": (dict(z_loss=float("inf")), r"z_loss: expected a finite number, got inf"),
    "softcap_zero": (dict(softcap=0.0), r"softcap: expected a number > 0.0, got 0.0"),
    "softcap_neg": (dict(softcap=-30), r"softcap: expected a number > 0.0, got -30"),
    "softcap_inf": (dict(softcap=float("inf")), r"softcap: expected a finite number, got inf"),
    "scale_zero": (dict(logit_scale=0), r"logit_scale: expected a number > 0.0, got 0"),
    "scale_bool": (dict(logit_scale=True), r"logit_scale: expected a finite number, got True"),
    "ignore_float": (dict(ignore_index=1.5), r"ignore_index: expected an int, got 1.5"),
    "ignore_bool": (dict(ignore_index=False), r"ignore_index: expected an int, got False"),
    "filter_zero": (dict(filter_eps=0.0), r"filter_eps: expected a number > 0.0, got 0.0"),
    "filter_big": (dict(filter_eps=2.0), r"filter_eps: expected a number <= 1.0, got 2.0"),
    "filter_str": (dict(filter_eps="fast"), r"filter_eps: expected a finite number, got 'fast'"),
    "return_lse": (dict(return_lse="yes"), r"return_lse: expected a bool, got 'yes'"),
    "chunk_zero": (dict(chunk_bytes=0), r"chunk_bytes: expected None or a positive int, got 0"),
    "chunk_bool": (dict(chunk_bytes=True), r"chunk_bytes: expected None or a positive int, got True"),
    "chunk_float": (dict(chunk_bytes=1e6), r"chunk_bytes: expected None or a positive int, got 1000000.0"),
    "impl": (dict(impl="cuda"), r"impl: expected one of \('auto', 'torch', 'triton'\), got 'cuda'"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensor_raises_expected_got(inputs, case):
    change, pattern = BAD_TENSORS[case]
    with pytest.raises(ValueError, match=pattern) as info:
        _call(inputs, **change(inputs))
    assert re.search(r"expected .+, got .+", str(info.value))


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_raises_expected_got(inputs, case):
    change, pattern = BAD_OPTIONS[case]
    with pytest.raises(ValueError, match=pattern):
        _call(inputs, **change)


@pytest.mark.parametrize("bad", [V, V + 1, -1, -101, 10**12])
@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32])
def test_targets_out_of_range_raise(inputs, bad, tdtype):
    targets = inputs["targets"].clone()
    targets[N // 2] = min(bad, 2**31 - 1) if tdtype == torch.int32 else bad
    targets = targets.to(tdtype)
    for reduction in ("mean", "none"):
        with pytest.raises(ValueError, match=rf"targets: expected class indices in \[0, {V}\) or "
                                             rf"ignore_index=-100, got {targets[N // 2].item()}"):
            _call(inputs, targets=targets, reduction=reduction)


def test_targets_range_respects_ignore_index_and_shift(inputs):
    targets = inputs["targets"].clone()
    targets[3] = -1
    _call(inputs, targets=targets, ignore_index=-1)  # -1 is the ignore_index here: fine
    with pytest.raises(ValueError, match="got -1"):
        _call(inputs, targets=targets)
    # With shift the first target is never used, so it is not checked either.
    targets = inputs["targets"].clone()
    targets[0] = 10**6
    _call(inputs, targets=targets, shift=False, ignore_index=10**6)
    h, t = inputs["hidden"][None], targets[None]
    loss = linear_cross_entropy(h, inputs["weight"], t, shift=True)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="got 1000000"):
        linear_cross_entropy(h, inputs["weight"], t)


def test_impl_triton_on_cpu_raises_with_reason(inputs, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot run: .*CUDA.*TRITON_INTERPRET=1"):
        _call(inputs, impl="triton")


def test_impl_triton_float64_raises_even_in_interpreter(inputs, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    d = {k: v.double() if v is not None and v.is_floating_point() else v for k, v in inputs.items()}
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot run: .*float64.*impl='torch'"):
        _call(d, impl="triton")


def test_impl_auto_warns_once_when_triton_cannot_import_on_cuda(monkeypatch):
    """A CUDA tensor under impl='auto' with a broken Triton runs the torch path (float32 copies of
    the weight and its gradient): say so once, naming the import error; explicit 'triton' raises."""
    import types
    import warnings
    from cutce import api, backends
    backends.warn_torch_fallback.cache_clear()
    reason = "Triton could not be imported (No module named 'triton')"
    monkeypatch.setattr(backends, "triton_reason", lambda *a, **k: reason)
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            assert api.choose_backend("auto", fake_cuda) == "torch"
    assert len(seen) == 1 and "No module named 'triton'" in str(seen[0].message)
    with pytest.raises(RuntimeError, match="No module named 'triton'"):
        api.choose_backend("triton", fake_cuda)
    backends.warn_torch_fallback.cache_clear()


def test_deterministic_keyword_is_gone(inputs):
    """It promised nothing (every backend is always bitwise reproducible): no dead option."""
    with pytest.raises(TypeError, match="deterministic"):
        _call(inputs, deterministic=True)


def test_impl_auto_and_filter_eps_on_cpu_equal_torch(inputs):
    ref = _call(inputs, impl="torch", reduction="none")
    for kw in (dict(impl="auto"), dict(filter_eps="auto"), dict(filter_eps=0.5)):
        torch.testing.assert_close(_call(inputs, reduction="none", **kw), ref, rtol=0, atol=0)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5)])
def test_empty_input(gen, lead):
    h, w, t, b, tw = make_inputs(gen, lead, D, V, bias=True, token_weights=True)
    for reduction, expect in (("mean", torch.tensor(0.0)), ("sum", torch.tensor(0.0))):
        loss = linear_cross_entropy(h, w, t, b, token_weights=tw, reduction=reduction)
        assert loss.shape == () and loss.item() == expect.item()
        loss.backward()
    none, lse = linear_cross_entropy(h, w, t, b, reduction="none", return_lse=True)
    assert none.shape == lead and lse.shape == lead
    for p in (h, w, b):
        assert p.grad is not None and not p.grad.any()


def test_shift_leaves_nothing(gen):
    h, w, t, _, _ = make_inputs(gen, (3, 1), D, V)
    loss, lse = linear_cross_entropy(h, w, t, shift=True, return_lse=True)
    assert loss.item() == 0.0 and lse.shape == (3, 0)
    none = linear_cross_entropy(h, w, t, shift=True, reduction="none")
    assert none.shape == (3, 0)


def test_output_shapes_and_dtypes(gen):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        h, w, t, _, _ = make_inputs(gen, (2, 5, 3), D, V, dtype)
        out_dt = torch.float64 if dtype == torch.float64 else torch.float32
        loss, lse = linear_cross_entropy(h, w, t, reduction="none", return_lse=True)
        assert loss.shape == lse.shape == (2, 5, 3) and loss.dtype == lse.dtype == out_dt
        loss, lse = linear_cross_entropy(h, w, t, shift=True, reduction="none", return_lse=True)
        assert loss.shape == lse.shape == (2, 5, 2)  # shift is along the last token axis
        loss = linear_cross_entropy(h, w, t)
        assert loss.shape == () and loss.dtype == out_dt
        loss.backward()
        assert h.grad.dtype == dtype and w.grad.dtype == dtype


def test_autocast_casts_like_f_linear(gen):
    h, w, t, b, tw = make_inputs(gen, (3, 7), D, V, bias=True, token_weights=True)
    kw = dict(label_smoothing=0.1, token_weights=tw, return_lse=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, lse = linear_cross_entropy(h, w, t, b, **kw)
        # mixed input dtypes are fine under autocast, as for F.linear
        loss_mixed, _ = linear_cross_entropy(h, w.bfloat16(), t, b, **kw)
    hb, wb, bb = (x.detach().bfloat16().requires_grad_() for x in (h, w, b))
    loss_b, lse_b = linear_cross_entropy(hb, wb, t, bb, **kw)
    torch.testing.assert_close(loss, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_b, rtol=0, atol=0)
    torch.testing.assert_close(loss_mixed, loss_b, rtol=0, atol=0)
    (loss + lse.sum()).backward()
    (loss_b + lse_b.sum()).backward()
    for p, pb in ((h, hb), (w, wb), (b, bb)):
        assert p.grad.dtype == torch.float32  # grads land on the float32 leaves
        torch.testing.assert_close(p.grad, pb.grad.float(), rtol=0, atol=0)
    # and it is accurate: within the bf16 torch path's error of the float64 oracle
    ref, _ = oracle(hb, wb, t, bb, label_smoothing=0.1, token_weights=tw)
    low, _ = lowp_torch(hb, wb, t, bb, label_smoothing=0.1, token_weights=tw)
    assert rel_err(loss, ref) <= 1.5 * rel_err(low, ref) + 1e-6


def test_autocast_leaves_float64_alone(gen):
    h, w, t, _, _ = make_inputs(gen, 9, D, V, torch.float64)
    exact = linear_cross_entropy(h, w, t, reduction="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = linear_cross_entropy(h, w, t, reduction="none")
        with pytest.raises(ValueError, match=r"weight dtype: expected hidden's dtype torch.float64"):
            linear_cross_entropy(h, w.float(), t)
    assert inside.dtype == torch.float64
    torch.testing.assert_close(inside, exact, rtol=0, atol=0)


def test_dtype_mismatch_outside_autocast_mentions_autocast(inputs):
    with pytest.raises(ValueError, match=r"or use torch.autocast"):
        _call(inputs, weight=inputs["weight"].bfloat16(), bias=None)


OPTIONS = dict(ignore_index=3, reduction="sum", label_smoothing=0.2, z_loss=1e-3, softcap=4.0,
               logit_scale=0.8, shift=True, return_lse=True, impl="torch", chunk_bytes=300)


def test_module_equals_function(gen):
    h, w, t, b, tw = make_inputs(gen, (2, 9), D, V, bias=True, token_weights=True)
    mod = LinearCrossEntropyLoss(**OPTIONS)
    assert "softcap=4.0" in repr(mod) and isinstance(mod, torch.nn.Module)
    loss, lse = mod(h, w, t, b, token_weights=tw)
    loss2, lse2 = linear_cross_entropy(h, w, t, b, token_weights=tw, **OPTIONS)
    torch.testing.assert_close(loss, loss2, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse2, rtol=0, atol=0)
    assert torch.isfinite(loss) and torch.isfinite(lse).all()
    # default module: mean cross-entropy
    torch.testing.assert_close(LinearCrossEntropyLoss()(h, w, t), linear_cross_entropy(h, w, t))


def test_module_rejects_bad_options():
    with pytest.raises(TypeError, match="unknown option"):
        LinearCrossEntropyLoss(label_smothing=0.1)
    with pytest.raises(TypeError, match="token_weights"):
        LinearCrossEntropyLoss(token_weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"softcap: expected a number > 0.0, got -1"):
        LinearCrossEntropyLoss(softcap=-1)
    with pytest.raises(ValueError, match=r"reduction: expected"):
        LinearCrossEntropyLoss(reduction="max")


def test_public_names():
    assert callable(cutce.linear_cross_entropy) and isinstance(cutce.__version__, str)
    assert "filter_eps" in cutce.linear_cross_entropy.__doc__
