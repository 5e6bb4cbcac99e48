"""cutce.transformers.patch under TRL's trainers, and the log line that says cutce is on (float32
CPU, tiny random models, offline).

A model patched by cutce.transformers.patch (an instance, a class, a PEFT model) that TRL hooks
gets cutce's fused head: SFTTrainer trains it to the same logs and weights as TRL's own head,
and TRL's kernel never runs. The patch's options under TRL's head; the binding of cutce's hook
beside cutce.trl.patch()/unpatch() and cutce.transformers.unpatch(); a TRL that cutce does not
support warns. The INFO line of the "cutce" logger: once per model and route, with the planner's
backend and strategy. (The binding in a fresh interpreter, TRL imported after the patch:
test_trl.py.)
"""

from __future__ import annotations

import gc
import logging
import re

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from trl.trainer import utils as trl_utils  # noqa: E402

import cutce  # noqa: E402
import cutce.transformers as ct  # noqa: E402
import cutce.trl as ctrl  # noqa: E402
import trl_models  # noqa: E402
from cutce.integrations import trl as hook_module  # noqa: E402
from cutce.integrations import trl_forward, trl_route  # noqa: E402
from hf_models import T, VOCAB, make_model  # noqa: E402
from trl_cases import _NoTRLHead, assert_logs_match  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LINE = re.compile(r"cutce computes (\w+)'s LM head \(([\w.]+), ([^)]*)\): (\d+) tokens x D=(\d+) "
                  r"x V=(\d+), (\w+), backend=(torch|triton), strategy=(recompute|fused|keep)$")


def cutce_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "cutce" and r.levelno == logging.INFO]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, T), generator=g)
    return dict(input_ids=ids, labels=ids.masked_fill(torch.arange(T) < 4, -100))


def hooked_by_cutce(model):
    """The _Hook settings of cutce's fused forward on the model, or None (TRL's or no hook)."""
    return getattr(vars(model).get("forward"), trl_forward.MARK, None)


@pytest.fixture(scope="module")
def trl_reference():
    """SFTTrainer's logs and weights with TRL's own head (one step)."""
    logs, params, _ = trl_models.train("sft", "llama", steps=1)
    return logs, params


def sft_without_trl_head(monkeypatch, **train_kwargs):
    """One SFT step with TRL's kernel made to raise; the number of cutce head calls too."""
    calls, real = [], trl_forward.linear_log_probs
    with monkeypatch.context() as m:
        m.setattr(trl_forward, "linear_log_probs", lambda *a, **k: calls.append(1) or real(*a, **k))
        m.setattr(trl_utils, "_ChunkedLogProbFunction", _NoTRLHead)
        logs, params, trainer = trl_models.train("sft", "llama", steps=1, **train_kwargs)
    return logs, params, trainer, len(calls)


def assert_same_training(reference, logs, params):
    logs_a, params_a = reference
    assert_logs_match(logs_a, logs, 1)
    assert params_a.keys() == params.keys() and params_a
    for name, p in params_a.items():
        torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-5, msg=name)


# --- SFTTrainer on a patched model --------------------------------------------------------------


def test_sft_trainer_on_a_patched_instance_runs_cutce_head(monkeypatch, caplog, trl_reference):
    caplog.set_level(logging.INFO, logger="cutce")
    models = []
    logs, params, trainer, calls = sft_without_trl_head(
        monkeypatch, prepare=lambda m: models.append(ct.patch(m)) or m)
    assert calls >= 1  # cutce's head ran; TRL's would have raised
    assert hooked_by_cutce(models[0]).route == "cutce.transformers.patch"
    assert_same_training(trl_reference, logs, params)
    lines = cutce_lines(caplog)
    assert len(lines) == 1, lines  # one model, one route, one line
    match = LINE.match(lines[0])
    assert match, lines[0]
    model, route, what, _, d, v, dtype, backend, strategy = match.groups()
    assert (model, route, d, v, dtype, backend) == ("LlamaForCausalLM", "cutce.transformers.patch",
                                                    "32", str(VOCAB), "float32", "torch")
    assert what == "TRL's fused LM head: log_probs, entropy, is_top1" and strategy == "recompute"


def test_sft_trainer_on_a_patched_class_runs_cutce_head(monkeypatch, trl_reference):
    cls = type(make_model("llama"))
    ct.patch(cls, memory_budget=0.5)
    try:
        logs, params, trainer, calls = sft_without_trl_head(monkeypatch)
    finally:
        ct.unpatch(cls)
    assert calls >= 1
    hook = hooked_by_cutce(trainer.model)
    assert hook.route == "cutce.transformers.patch" and hook.memory_budget == 0.5
    assert_same_training(trl_reference, logs, params)


def test_peft_model_and_options_under_trl_hook():
    """A PEFT model (TRL hooks its base model), the options carried and merged with
    cutce.trl.patch()'s, a model patched with options TRL's head cannot honour."""
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    ct.patch(lora, impl="torch", memory_budget=0.25)
    base = lora.get_base_model()
    trl_utils.add_fused_lm_head(base, outputs=("log_probs", "entropy"))
    hook = hooked_by_cutce(base)
    assert (hook.route, hook.impl, hook.memory_budget) == ("cutce.transformers.patch", "torch", 0.25)
    out = lora(**batch(), fused_lm_head=True)
    out.loss.backward()
    assert out.entropy is not None
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)

    ctrl.patch(memory_budget=0.0)
    try:
        own = ct.patch(make_model("llama"), impl="torch")  # the patch's impl, patch()'s budget
        trl_utils.add_fused_lm_head(own)
        assert (hooked_by_cutce(own).impl, hooked_by_cutce(own).memory_budget) == ("torch", 0.0)
    finally:
        ctrl.unpatch()

    smoothed = ct.patch(make_model("llama"), label_smoothing=0.1, z_loss=1e-4)
    with pytest.raises(ValueError, match=r"\['label_smoothing', 'z_loss'\].*got label_smoothing=0\.1"):
        trl_utils.add_fused_lm_head(smoothed)
    filtered = ct.patch(make_model("llama"), filter_eps="auto", label_smoothing=0.0)
    with pytest.warns(UserWarning, match=r"\['filter_eps'\].*exact"):
        trl_utils.add_fused_lm_head(filtered)
    assert hooked_by_cutce(filtered) is not None


def test_binding_follows_both_routes():
    """cutce's hook is bound while either route needs it, and gives every other model TRL's."""
    gc.collect()  # patched models that earlier tests dropped no longer hold the hook
    assert not trl_route.wanted(), "an earlier test keeps a patched model or class alive"
    ours = hook_module._hook
    original = trl_utils.add_fused_lm_head
    original = hook_module._BOUND.original if original is ours else original
    sft = __import__("trl.trainer.sft_trainer", fromlist=["x"])

    model = ct.patch(make_model("llama"))
    assert trl_utils.add_fused_lm_head is ours and sft.add_fused_lm_head is ours
    assert not ctrl.is_patched()
    plain = make_model("llama")
    trl_utils.add_fused_lm_head(plain)
    assert hooked_by_cutce(plain) is None  # TRL's own head for a model no route covers

    ctrl.patch()
    assert ctrl.is_patched()
    covered = make_model("llama")
    trl_utils.add_fused_lm_head(covered)
    assert hooked_by_cutce(covered).route == "cutce.trl.patch"
    ctrl.unpatch()
    assert trl_utils.add_fused_lm_head is ours and not ctrl.is_patched()  # the patched model's

    ct.unpatch(model)
    assert trl_utils.add_fused_lm_head is original and sft.add_fused_lm_head is original
    ctrl.patch()
    ct.unpatch(ct.patch(make_model("llama")))
    assert trl_utils.add_fused_lm_head is ours and ctrl.is_patched()  # patch()'s still
    ctrl.unpatch()
    assert trl_utils.add_fused_lm_head is original


def test_unsupported_trl_warns_naming_the_trl_route(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.14.2")
    with pytest.warns(UserWarning, match=r"TRL 1\.14\.2 is not supported.*cutce\.trl\.patch\(\)"):
        model = ct.patch(make_model("llama"))
    ct.unpatch(model)


# --- the log line -------------------------------------------------------------------------------


def test_log_line_once_per_model_and_route(caplog):
    model = ct.patch(make_model("llama"))
    with caplog.at_level(logging.WARNING, logger="cutce"):
        model(**batch())
    assert cutce_lines(caplog) == []  # nothing while INFO is off, and nothing recorded
    caplog.set_level(logging.INFO, logger="cutce")
    model(**batch())
    model(**batch(1))
    model(input_ids=batch()["input_ids"])  # no labels: the original forward, no head by cutce
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(40, 8)
    cutce.linear_cross_entropy(hidden, weight, torch.randint(0, 40, (6,)))  # no route: no line
    other = ct.patch(make_model("llama"))
    other(**batch())
    lines = cutce_lines(caplog)
    assert len(lines) == 2, lines
    for line in lines:
        match = LINE.match(line)
        assert match, line
        assert match.group(2, 3) == ("cutce.transformers.patch", "the loss")
        assert int(match.group(4)) == 2 * T and match.group(8) == "torch"  # every position

    caplog.clear()
    ctrl.patch()
    try:
        hooked = make_model("qwen2")
        trl_utils.add_fused_lm_head(hooked, temperature=0.7)
        hooked(**batch(), fused_lm_head=True)
        hooked(**batch(), fused_lm_head=True)
    finally:
        ctrl.unpatch()
    (line,) = cutce_lines(caplog)
    match = LINE.match(line)
    assert match and match.group(1, 2, 3) == ("Qwen2ForCausalLM", "cutce.trl.patch",
                                              "TRL's fused LM head: log_probs")
    assert int(match.group(4)) == int((batch()["labels"][:, 1:] != -100).sum())  # labelled only
