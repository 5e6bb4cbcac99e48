"""cutce.transformers: the patched loss and gradients equal the original for every family (float32).

Tiny random-initialised models built from configs (nothing is downloaded). A family that the
installed transformers lacks is skipped. Run against another transformers release with
``PYTHONPATH=<dir holding it> pytest tests/test_transformers.py``.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from cutce import transformers as ct  # noqa: E402
from cutce.integrations.transformers import patching  # noqa: E402
from hf_models import FAMILIES, T, VOCAB, make_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def batch(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100   # a masked prompt
    labels[1, -3:] = -100  # right padding
    return ids, labels


def loss_and_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(out_a, grads_a, out_b, grads_b):
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name, ga in grads_a.items():
        scale = ga.abs().max().item()
        torch.testing.assert_close(grads_b[name], ga, rtol=1e-5, atol=1e-5 * scale + 1e-9, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_original(family):
    model = make_model(family)
    ids, labels = batch()
    n_items = (labels[:, 1:] != -100).sum() + 3  # as a Trainer would pass it, over a larger batch
    original_forward = type(model).forward
    variants = [dict(), dict(num_items_in_batch=n_items)]
    reference = [loss_and_grads(model, input_ids=ids, labels=labels, **v) for v in variants]
    logits = model(input_ids=ids).logits
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        assert reference[0][0].aux_loss is not None  # the router loss is part of what is compared

    calls = []
    ct.patch(model)
    assert ct.is_patched(model) and not ct.is_patched(type(model))
    for v, (out_a, grads_a) in zip(variants, reference):
        out_b, grads_b = loss_and_grads(model, input_ids=ids, labels=labels, **v)
        assert type(out_b) is type(out_a) and out_b.logits is None
        assert_same(out_a, grads_a, out_b, grads_b)
        calls.append(out_b.loss)
    assert torch.equal(model(input_ids=ids).logits, logits)  # no labels: the original forward
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], calls[0])

    ct.unpatch(model)
    assert "forward" not in model.__dict__ and type(model).forward is original_forward
    again, _ = loss_and_grads(model, input_ids=ids, labels=labels)
    assert again.logits is not None and torch.equal(again.loss, reference[0][0].loss)


def test_logits_to_keep_shift_labels_and_positional_labels():
    model = make_model("llama")
    ids, labels = batch(1)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shifted[0, 5] = 7
    cases = [dict(input_ids=ids, labels=labels[:, -5:], logits_to_keep=5),
             dict(input_ids=ids, labels=labels, shift_labels=shifted),
             dict(input_ids=ids, labels=labels.masked_fill(labels == -100, 7), ignore_index=7)]
    reference = [loss_and_grads(model, **c) for c in cases]
    ref_positional = model(ids, None, None, None, None, labels).loss
    ct.patch(model, impl="torch")
    for c, (out_a, grads_a) in zip(cases, reference):
        assert_same(out_a, grads_a, *loss_and_grads(model, **c))
    torch.testing.assert_close(model(ids, None, None, None, None, labels).loss, ref_positional)


def test_patch_class_and_subclass_then_unpatch_exactly():
    cls = transformers.LlamaForCausalLM
    before = cls.__dict__["forward"]
    sub = type("TinyLlama", (cls,), {})
    ids, labels = batch()
    ref = make_model("llama")(input_ids=ids, labels=labels).loss
    ct.patch(cls)
    try:
        assert ct.is_patched(make_model("llama"))
        with pytest.raises(ValueError, match="already patched"):
            ct.patch(make_model("llama"))
        out = make_model("llama")(input_ids=ids, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    finally:
        ct.unpatch(cls)
    assert cls.__dict__["forward"] is before
    ct.patch(sub)
    assert "forward" in sub.__dict__
    ct.unpatch(sub)
    assert "forward" not in sub.__dict__ and sub.forward is before
    with pytest.raises(ValueError, match="not patched"):
        ct.unpatch(sub)


def test_deepcopy_of_patched_instance_uses_its_own_weights():
    model = ct.patch(make_model("llama"))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    ids, labels = batch()
    assert twin(input_ids=ids, labels=labels).loss != model(input_ids=ids, labels=labels).loss
    assert twin.forward.__self__ is twin


def test_refuses_what_it_cannot_reproduce():
    ids, labels = batch()
    # Llama's forward ignores final_logit_softcapping: the probe sees no softcap and refuses.
    model = ct.patch(make_model("llama", final_logit_softcapping=3.0))
    with pytest.raises(ct.UnsupportedModelError, match="LlamaForCausalLM.*transforms the logits"):
        model(input_ids=ids, labels=labels)
    model = ct.patch(make_model("llama"))
    model.loss_function = lambda *a, **k: 0.0
    with pytest.raises(ct.UnsupportedModelError, match="loss_function"):
        model(input_ids=ids, labels=labels)
    model = ct.patch(make_model("llama"))
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ct.UnsupportedModelError, match="not a plain torch.nn.Linear"):
        model(input_ids=ids, labels=labels)
    with pytest.raises(ct.UnsupportedModelError, match="takes no labels"):
        ct.patch(transformers.LlamaModel)
    if hasattr(transformers, "BartForCausalLM"):  # computes its own CrossEntropyLoss inline
        with pytest.raises(ct.UnsupportedModelError, match="self.loss_function"):
            ct.patch(transformers.BartForCausalLM)
    with pytest.raises(TypeError, match="softcap"):
        ct.patch(make_model("llama"), softcap=3.0)
    with pytest.raises(TypeError):
        ct.patch(make_model("llama"), no_such_option=1)


# peft 0.21 calls a transformers 5.x API that warns of its own deprecation.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_with_frozen_head_matches_unpatched_peft_model():
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                init_lora_weights=False)  # nonzero B: every adapter weight gets a gradient
    model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(target_modules=["q_proj", "v_proj"], **lora))
    assert not model.get_base_model().lm_head.weight.requires_grad
    ids, labels = batch()
    out_a, grads_a = loss_and_grads(model, input_ids=ids, labels=labels)
    assert len(grads_a) == 8 and all("lora_" in n for n in grads_a)  # 2 layers x (q, v) x (A, B)
    assert ct.patch(model, impl="torch") is model
    assert ct.is_patched(model) and ct.is_patched(model.get_base_model())
    out_b, grads_b = loss_and_grads(model, input_ids=ids, labels=labels)
    assert out_b.logits is None
    assert_same(out_a, grads_a, out_b, grads_b)
    ct.unpatch(model)
    assert not ct.is_patched(model) and "forward" not in model.get_base_model().__dict__
    # LoRA on the head itself: refused, not a loss without the adapter's share of the logits.
    model = ct.patch(peft.get_peft_model(make_model("llama"), peft.LoraConfig(target_modules=["lm_head"], **lora)))
    with pytest.raises(ct.UnsupportedModelError, match="not a plain torch.nn.Linear"):
        model(input_ids=ids, labels=labels)
    with pytest.raises(ct.UnsupportedModelError, match="PEFT class"):
        ct.patch(type(model))


def test_import_cutce_does_not_import_transformers():
    code = "import sys, cutce, cutce.api; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


class _Sequences(torch.utils.data.Dataset):
    """Counting sequences with a random start: learnable within a few steps."""

    def __init__(self, n=64):
        starts = torch.randint(3, VOCAB, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(T)) % (VOCAB - 3) + 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_steps_lower_the_loss(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    seen = []
    real = patching.linear_cross_entropy
    monkeypatch.setattr(patching, "linear_cross_entropy", lambda *a, **k: seen.append(1) or real(*a, **k))
    model = ct.patch(make_model("llama"))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Sequences())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(seen) == 20 and len(losses) == 10
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


def test_demo_pieces_run(tmp_path):
    """The demo's tokenizer, training loop and plot on a tiny setting (the full run is
    `python examples/demo.py`)."""
    import importlib.util
    import pathlib

    pytest.importorskip("tokenizers")
    pytest.importorskip("matplotlib")
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "demo.py"
    spec = importlib.util.spec_from_file_location("cutce_demo_example", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    ids, learned = demo.tokenize(demo.read_corpus(0.2), 600)
    assert learned == 600 and ids.max() < 600
    spec = dict(device="cpu", vocab=600, hidden=32, layers=1, heads=2, seq_len=32, batch=2, steps=4,
                lr=1e-2, seed=0, data_seed=0, impl="torch")
    runs = [dict(demo.train(dict(spec, patched=p), ids), label=name, seed=0)
            for p, name in ((False, "original"), (True, "cutce"))]
    assert demo.mean_abs_diff(runs[0]["losses"], runs[1]["losses"], 2) < 1e-4
    summary = dict(runs=runs, last_k=2, device="cpu", config=spec)
    demo.plot(summary, tmp_path / "demo.png")
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_trainer_example_runs():
    """examples/hf_trainer.py: transformers.Trainer with the patch, its loss checked first."""
    import os
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(root / "examples" / "hf_trainer.py")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("OK") and "4 steps with cutce's loss" in proc.stdout
