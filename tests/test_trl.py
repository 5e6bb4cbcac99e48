"""cutce.trl: TRL's LM-head hook replaced by cutce (float32 CPU, tiny random models, offline).

(a) cutce's add_fused_lm_head against TRL's own on the same model and batch: every output and the
parameters' gradients; (b) the binding, the version checks and the refusals; (c) no (batch, seq,
vocab) tensor in a fused step. TRL's trainers with and without cutce.trl.patch() are
test_trl_trainers.py.
"""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("transformers")
from trl.trainer import utils as trl_utils  # noqa: E402

import cutce.trl as ctrl  # noqa: E402
from hf_models import T, VOCAB, make_model  # noqa: E402
from trl_cases import HIDDEN, VocabSized, chunk_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
FIELDS = ("loss",) + ALL + ("label_mask", "aux_loss")
TRL_HOOK = trl_utils.add_fused_lm_head  # TRL's own (collected before any test patches a model)


def padded_batch(seed=0, b=2, t=T):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a prompt
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def packed_batch(seed=0):
    """Padding-free: three documents in one row, position_ids restart, labels -100 at each start."""
    g = torch.Generator().manual_seed(seed)
    lengths = (5, 7, 4)
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return dict(input_ids=ids, position_ids=pos, labels=ids.masked_fill(pos == 0, -100))


def fused_step(hook, model, call, **hook_kwargs):
    """Hook the model, one fused call, backward of loss (+ entropy when asked): (output, grads)."""
    hook(model, **hook_kwargs)
    model.zero_grad(set_to_none=True)
    out = model(**call, fused_lm_head=True)
    target = out.loss + (0.1 * out.entropy.sum() if out.entropy is not None else 0.0)
    target.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_outputs_match(ref, got, rtol=1e-5, atol=1e-5):
    assert type(got) is type(ref)
    for field in FIELDS:
        a, b = getattr(ref, field), getattr(got, field)
        assert (a is None) == (b is None), field
        if a is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (field, a.dtype, b.dtype, a.shape, b.shape)
        if a.dtype == torch.bool:
            assert torch.equal(a, b), field
        else:
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=field)


def assert_grads_match(ga, gb, rtol=1e-5):
    assert ga.keys() == gb.keys() and ga
    for name, a in ga.items():
        scale = a.abs().max().item()
        torch.testing.assert_close(gb[name], a, rtol=rtol, atol=rtol * scale + 1e-9, msg=name)


def compare_hooks(model, call, **hook_kwargs):
    ref, ga = fused_step(TRL_HOOK, copy.deepcopy(model), call, **hook_kwargs)
    got, gb = fused_step(ctrl.add_fused_lm_head, copy.deepcopy(model), call, **hook_kwargs)
    assert_outputs_match(ref, got)
    assert_grads_match(ga, gb)
    return ref, got


# --- (a) the hook against TRL's ----------------------------------------------------------------

CASES = {
    "temperature_all_outputs": (dict(temperature=0.7, outputs=ALL), padded_batch),
    "default_outputs": (dict(), padded_batch),
    "entropy_shift_labels": (dict(temperature=1.3, outputs=("log_probs", "entropy")),
                             lambda: {**{k: v for k, v in padded_batch().items() if k != "labels"},
                                      "shift_labels": torch.nn.functional.pad(
                                          padded_batch()["labels"][:, 1:], (0, 1), value=-100)}),
    "num_items_in_batch": (dict(outputs=("log_probs", "is_top1")),
                           lambda: dict(padded_batch(), num_items_in_batch=torch.tensor(37))),
    "packed": (dict(temperature=0.9, outputs=ALL), packed_batch),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hook_matches_trl(family, case):
    hook_kwargs, make_call = CASES[case]
    ref, got = compare_hooks(make_model(family), make_call(), **hook_kwargs)
    shape = make_call().get("shift_labels", make_call().get("labels")).shape
    want = shape if case == "entropy_shift_labels" else (shape[0], shape[1] - 1)
    assert tuple(got.log_probs.shape) == tuple(want)
    for field in ALL[1:]:
        assert (getattr(got, field) is None) == (field not in hook_kwargs.get("outputs", ()))
    assert got.aux_loss is None and got.label_mask.dtype == torch.bool


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "qwen2_moe"])
def test_hook_matches_trl_logit_transform_and_moe(family):
    """Softcap (gemma2), logit scale (cohere, granite) and the MoE router loss (qwen2_moe)."""
    ref, got = compare_hooks(make_model(family), padded_batch(), temperature=0.8, outputs=ALL)
    assert (got.aux_loss is not None) == (family == "qwen2_moe")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_all_masked_batch_is_a_connected_zero(family):
    call = dict(padded_batch(), labels=torch.full((2, T), -100))
    ref, got = compare_hooks(make_model(family), call, outputs=ALL)
    assert got.loss.item() == 0.0 and got.loss.requires_grad
    assert not got.label_mask.any() and not got.log_probs.any() and not got.is_top1.any()


def test_cast_lm_head_to_fp32_bf16_model():
    """A bf16 model with the head in float32: both compute the head from the same bf16 hidden
    states in float32, so they agree to float32 rounding (the weight's gradient to bf16's)."""
    model = make_model("llama").to(torch.bfloat16)
    hook_kwargs = dict(temperature=0.9, cast_lm_head_to_fp32=True, outputs=ALL)
    ref, ga = fused_step(TRL_HOOK, copy.deepcopy(model), padded_batch(), **hook_kwargs)
    got, gb = fused_step(ctrl.add_fused_lm_head, copy.deepcopy(model), padded_batch(), **hook_kwargs)
    assert got.log_probs.dtype == torch.float32
    assert_outputs_match(ref, got)
    assert_grads_match(ga, gb, rtol=2e-2)


def test_peft_lora_model():
    """TRL hooks the base model of a PEFT model and calls the PEFT model: the LoRA gradients agree;
    LoRA on the head itself is refused (TRL's hook would drop its share of the logits)."""
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    torch.manual_seed(0)
    model = peft.get_peft_model(make_model("qwen2"), peft.LoraConfig(**lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained adapter, so that it changes the log-probs
    results = []
    for hook in (TRL_HOOK, ctrl.add_fused_lm_head):
        twin = copy.deepcopy(model)
        hook(twin.get_base_model(), temperature=0.8, outputs=("log_probs", "entropy"))
        twin.zero_grad(set_to_none=True)
        out = twin(**padded_batch(), fused_lm_head=True)
        (out.loss + out.entropy.sum()).backward()
        results.append((out, {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}))
    assert_outputs_match(results[0][0], results[1][0])
    assert all("lora" in n for n in results[0][1])
    assert_grads_match(results[0][1], results[1][1])
    head_lora = peft.get_peft_model(make_model("llama"),
                                    peft.LoraConfig(**dict(lora, target_modules=["lm_head"])))
    with pytest.raises(ctrl.UnsupportedModelError, match="not a plain torch.nn.Linear"):
        ctrl.add_fused_lm_head(head_lora.get_base_model())


def test_calls_without_the_flag_run_the_original_forward():
    model = make_model("llama")
    ids = padded_batch()["input_ids"]
    logits = model(input_ids=ids).logits
    greedy = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    ctrl.add_fused_lm_head(model, temperature=0.5, outputs=ALL)
    assert torch.equal(model(input_ids=ids).logits, logits)
    with_labels = model(input_ids=ids, labels=ids)
    assert with_labels.logits is not None and with_labels.loss.requires_grad
    assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False,
                                      pad_token_id=0), greedy)
    twin = copy.deepcopy(model)  # the hook is a bound method: the copy runs its own parameters
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    a = model(**padded_batch(), fused_lm_head=True).log_probs
    b = twin(**padded_batch(), fused_lm_head=True).log_probs
    assert not torch.allclose(a, b)


# --- (b) refusals, version checks, the binding ----------------------------------------------


def test_refusals():
    model = make_model("llama")
    with pytest.raises(ValueError, match="outputs"):
        ctrl.add_fused_lm_head(model, outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="temperature"):
        ctrl.add_fused_lm_head(model, temperature=0.0)
    ctrl.add_fused_lm_head(model)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**padded_batch(), logits_to_keep=3, fused_lm_head=True)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=padded_batch()["input_ids"], fused_lm_head=True)
    with pytest.raises(ctrl.UnsupportedModelError, match="PreTrainedModel"):
        ctrl.add_fused_lm_head(torch.nn.Linear(2, 2))


def test_unsupported_trl_versions(monkeypatch):
    def other_signature(model, temperature=1.0, outputs=("log_probs",)):
        pass

    bound = trl_utils.add_fused_lm_head  # TRL's, or cutce's hook while a model is patched
    monkeypatch.setattr(trl_utils, "add_fused_lm_head", other_signature)
    with pytest.raises(ctrl.UnsupportedTRLError, match=r"parameters .*TRL >= 1\.15.*1\.16\.0"):
        ctrl.patch()
    monkeypatch.delattr(trl_utils, "add_fused_lm_head")
    with pytest.raises(ctrl.UnsupportedTRLError, match=r"has no add_fused_lm_head.*TRL >= 1\.15"):
        ctrl.patch()
    monkeypatch.undo()

    import dataclasses

    monkeypatch.setattr(trl_utils, "FusedCausalLMOutput",
                        dataclasses.make_dataclass("FusedCausalLMOutput", ["loss", "log_probs"]))
    with pytest.raises(ctrl.UnsupportedTRLError, match=r"fields .*TRL >= 1\.15"):
        ctrl.patch()
    monkeypatch.undo()
    monkeypatch.setattr(trl, "__version__", "1.14.2")
    with pytest.raises(ctrl.UnsupportedTRLError, match=r"TRL 1\.14\.2 is not supported.*TRL >= 1\.15"):
        ctrl.patch()
    assert not ctrl.is_patched() and trl_utils.add_fused_lm_head is bound


def test_patch_binds_in_every_trainer_module_and_unpatch_restores():
    """In a fresh interpreter: import cutce.trl imports no TRL; a class patched by
    cutce.transformers before TRL is imported has cutce's hook bound as TRL loads (without
    importing TRL itself), its unpatch gives TRL's back; trainer modules imported before and after
    patch() both get cutce's hook; unpatch() gives TRL's back everywhere."""
    script = r"""
import sys
import cutce, cutce.trl, cutce.transformers
assert "trl" not in sys.modules and "transformers" not in sys.modules
assert not cutce.trl.is_patched()
from transformers import LlamaForCausalLM
cutce.transformers.patch(LlamaForCausalLM)
assert "trl" not in sys.modules
from trl import DPOTrainer  # imported before the patch
import trl.trainer.utils as u
assert getattr(u.add_fused_lm_head, "_cutce_trl_hook", False) and not cutce.trl.is_patched()
assert sys.modules["trl.trainer.dpo_trainer"].add_fused_lm_head is u.add_fused_lm_head
cutce.transformers.unpatch(LlamaForCausalLM)
original = u.add_fused_lm_head
assert original.__module__ == "trl.trainer.utils"
assert sys.modules["trl.trainer.dpo_trainer"].add_fused_lm_head is original
cutce.trl.patch()
from trl import SFTTrainer, GRPOTrainer, RLOOTrainer, KTOTrainer  # after
names = ["trl.trainer.utils"] + [f"trl.trainer.{k}_trainer" for k in ("sft", "dpo", "grpo", "rloo", "kto")]
assert all(sys.modules[n].add_fused_lm_head is u.add_fused_lm_head for n in names)
assert u.add_fused_lm_head is not original and cutce.trl.is_patched()
try:
    cutce.trl.patch()
    raise AssertionError("patched twice")
except ValueError:
    pass
cutce.trl.unpatch()
assert all(sys.modules[n].add_fused_lm_head is original for n in names)
assert not cutce.trl.is_patched()
print("OK")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr


# --- (c) no (batch, seq, vocab) tensor in a fused step ------------------------------------------


def test_no_logits_sized_tensor_in_a_patched_step(monkeypatch):
    vocab, b, t = 1000, 4, 24  # n = 92 scored positions > hidden 32: a V x D tensor is not N x V
    n = b * (t - 1)
    chunk_rows(monkeypatch, 16, vocab)
    model = make_model("llama", vocab_size=vocab)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    rows = {}
    for name, hook in (("trl", TRL_HOOK), ("cutce", ctrl.add_fused_lm_head)):
        twin = copy.deepcopy(model)
        hook(twin, temperature=0.7, outputs=ALL)
        with VocabSized(vocab) as mode:
            out = twin(input_ids=ids, labels=ids, fused_lm_head=True)
            (out.loss + out.entropy.sum()).backward()
        rows[name] = mode.rows
    assert rows["trl"] >= n  # the detector sees TRL's CPU head score all positions at once
    assert rows["cutce"] <= HIDDEN, rows  # chunks of 16 tokens, and V x D


# --- the example ------------------------------------------------------------------------------


def test_example_runs():
    pytest.importorskip("tokenizers")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_sft.py")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout
