"""cutce.transformers.token_log_probs equals the issue's reference expression (float32, CPU).

The reference materializes ``model(...).logits``; values of both outputs and the gradients of every
trainable parameter through both are compared, for families with and without a logit transform
(softcap: Gemma 2; scale: Cohere multiplies, Granite divides), a MoE model, padding in the
attention mask, ``logits_to_keep`` set and not, temperature != 1 (a float, per token, per
sequence), a PEFT LoRA model, and the refusals. Tiny random-init models from tests/hf_models.py's
configs. Also runs the examples built on it (examples/grpo_step.py, examples/dpo_loss.py) and the
GPU benchmark's CPU smoke mode (benchmarks/log_probs.py).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_models import T, VOCAB, make_model  # noqa: E402

from cutce import transformers as ct  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def batch(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as in batched generation
    ids[1, :4] = 0   # the pad token
    return ids, mask


def reference(model, ids, mask, logits_to_keep=None, temperature=1.0, **model_kwargs):
    """The issue's expression, verbatim."""
    logits = model(input_ids=ids, attention_mask=mask, **model_kwargs).logits[:, :-1] / temperature
    targets = ids[:, 1:]
    if logits_to_keep:
        logits, targets = logits[:, -logits_to_keep:], targets[:, -logits_to_keep:]
    lsm = logits.float().log_softmax(-1)
    logp = lsm.gather(-1, targets[..., None])[..., 0]
    entropy = -(lsm.exp() * lsm).sum(-1)
    return logp, entropy


def values_and_grads(model, fn, seed=1):
    """(logp, entropy) and the gradients of every trainable parameter of a random combination of
    both (so a wrong gradient through either output shows)."""
    model.zero_grad(set_to_none=True)
    logp, entropy = fn()
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(logp.shape, generator=g), torch.randn(entropy.shape, generator=g)
    ((logp * up[0]).sum() + (entropy * up[1]).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logp.detach(), entropy.detach(), grads


def assert_same(a, b):
    (logp_a, ent_a, grads_a), (logp_b, ent_b, grads_b) = a, b
    assert logp_b.dtype == torch.float32 and logp_b.shape == logp_a.shape == ent_b.shape
    torch.testing.assert_close(logp_b, logp_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name, ga in grads_a.items():
        assert grads_b[name] is not None and ga.abs().max() > 0, name
        scale = ga.abs().max().item()
        torch.testing.assert_close(grads_b[name], ga, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "cohere", "granite", "qwen3_moe"])
def test_matches_reference(family):
    model = make_model(family)
    ids, mask = batch()
    for k, temperature in ((None, 1.0), (5, 0.7)):
        ref = values_and_grads(model, lambda: reference(model, ids, mask, k, temperature))
        got = values_and_grads(model, lambda: ct.token_log_probs(
            model, ids, mask, logits_to_keep=k, temperature=temperature, return_entropy=True))
        assert got[0].shape == (2, k or T - 1)
        assert_same(ref, got)


def test_per_token_temperatures():
    """Mixed-temperature rollouts: a (B, T) tensor (temperature[:, t] for the token at t) and a
    (B,) one per sequence, with and without logits_to_keep."""
    model = make_model("gemma2")
    ids, mask = batch(3)
    temp = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) * 1.7 + 0.3
    per_seq = torch.tensor([0.6, 1.4])
    for given, divides in ((temp, temp[:, 1:, None]), (per_seq, per_seq[:, None, None])):
        for k in (None, 5):
            ref = values_and_grads(model, lambda: reference(model, ids, mask, k, divides))
            got = values_and_grads(model, lambda: ct.token_log_probs(
                model, ids, mask, logits_to_keep=k, temperature=given, return_entropy=True))
            assert_same(ref, got)


def test_positions_and_options():
    model = make_model("llama")
    ids, mask = batch(1)
    logp, entropy = reference(model, ids, None)
    one = ct.token_log_probs(model, ids)  # no mask, default temperature, log-probs only
    assert isinstance(one, torch.Tensor)
    torch.testing.assert_close(one, logp, rtol=1e-5, atol=1e-5)
    # logits_to_keep=k scores input_ids[:, -k:]: the last k columns of the full result; 0 = all.
    for k in (1, 3, T - 1):
        torch.testing.assert_close(ct.token_log_probs(model, ids, logits_to_keep=k), one[:, -k:])
    torch.testing.assert_close(ct.token_log_probs(model, ids, logits_to_keep=0), one)
    # model kwargs reach the model: explicit position ids shift the result as they shift the logits
    pos = torch.arange(T).expand(2, T) + 3
    ref_pos, _ = reference(model, ids, mask, position_ids=pos)
    torch.testing.assert_close(ct.token_log_probs(model, ids, mask, position_ids=pos, use_cache=False,
                                                  return_dict=False), ref_pos, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a frozen reference model in DPO / a KL term
        assert not ct.token_log_probs(model, ids, mask).requires_grad
    # A cutce-patched model: without labels its forward is the original one.
    ct.patch(model)
    torch.testing.assert_close(ct.token_log_probs(model, ids), one)


# peft 0.21 calls a transformers 5.x API that warns of its own deprecation.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora():
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False)
    model = peft.get_peft_model(make_model("gemma2"), peft.LoraConfig(target_modules=["q_proj", "v_proj"], **lora))
    ids, mask = batch(2)
    ref = values_and_grads(model, lambda: reference(model, ids, mask, 6, 0.9))
    got = values_and_grads(model, lambda: ct.token_log_probs(model, ids, mask, logits_to_keep=6,
                                                             temperature=0.9, return_entropy=True))
    assert len(got[2]) == 8 and all("lora_" in n for n in got[2])  # 2 layers x (q, v) x (A, B)
    assert_same(ref, got)
    with model.disable_adapter():  # what the adapters' context managers do still applies
        torch.testing.assert_close(ct.token_log_probs(model, ids, mask),
                                   reference(model, ids, mask)[0], rtol=1e-5, atol=1e-5)
    head_lora = peft.get_peft_model(make_model("llama"), peft.LoraConfig(target_modules=["lm_head"], **lora))
    with pytest.raises(ct.UnsupportedModelError, match="not a plain torch.nn.Linear"):
        ct.token_log_probs(head_lora, ids)


def test_refuses_unsupported_models():
    ids, _ = batch()
    # Llama ignores final_logit_softcapping: the probe sees no softcap where the config says one.
    with pytest.raises(ct.UnsupportedModelError, match="LlamaForCausalLM.*transforms the logits"):
        ct.token_log_probs(make_model("llama", final_logit_softcapping=3.0), ids)
    model = make_model("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ct.UnsupportedModelError, match="not a plain torch.nn.Linear"):
        ct.token_log_probs(model, ids)
    with pytest.raises(ct.UnsupportedModelError, match="expected a transformers PreTrainedModel"):
        ct.token_log_probs(torch.nn.Linear(4, 4), ids)


def test_validation_messages():
    model = make_model("llama")
    ids, mask = batch()
    bad = [
        (dict(input_ids=ids.float()), r"input_ids: expected an int64 or int32 tensor, got torch.float32"),
        (dict(input_ids=ids[0]), r"input_ids: expected shape \(B, T\) with T >= 2, got \(12,\)"),
        (dict(input_ids=ids[:, :1]), r"input_ids: expected shape \(B, T\) with T >= 2, got \(2, 1\)"),
        (dict(attention_mask=mask[:, 1:]), r"attention_mask: expected None or a tensor of input_ids' shape"),
        (dict(logits_to_keep=T), rf"logits_to_keep: expected None or an int in \[0, {T - 1}\].*got {T}"),
        (dict(logits_to_keep=-1), r"logits_to_keep: expected .* got -1"),
        (dict(logits_to_keep=True), r"logits_to_keep: expected .* got True"),
        (dict(temperature=0.0), r"temperature: expected a number > 0.0, got 0.0"),
        (dict(temperature=torch.ones(2, T - 1)), r"temperature: expected a float number, or a "
         rf"float tensor of shape \(2,\) or \(2, {T}\) \(input_ids'\), got torch.float32 tensor "
         rf"of shape \(2, {T - 1}\)"),
        (dict(temperature=torch.ones(2, dtype=torch.int64)), r"temperature: expected a float .*"
         r"got torch.int64 tensor of shape \(2,\)"),
        (dict(temperature=torch.ones(2, requires_grad=True)),
         r"temperature: expected a tensor that does not require grad .*got requires_grad=True"),
        (dict(return_entropy=1), r"return_entropy: expected a bool, got 1"),
        (dict(labels=ids), r"model_kwargs: expected no labels.*got \['labels'\]"),
    ]
    for change, message in bad:
        args = {"input_ids": ids, "attention_mask": mask, **change}
        with pytest.raises(ValueError, match=message):
            ct.token_log_probs(model, args.pop("input_ids"), args.pop("attention_mask"), **args)


ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_script(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("script", ["grpo_step.py", "dpo_loss.py"])
def test_example_runs(script):
    proc = run_script(str(ROOT / "examples" / script))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout
    # Each example checks its first call against model(...).logits and prints the difference.
    diffs = [float(x) for x in re.findall(r"max \|d\w+(?:\(sequence\))?\| ([0-9.e+-]+)", proc.stdout)]
    assert diffs and max(diffs) < 1e-4, proc.stdout


def test_bench_script_cpu_smoke(tmp_path):
    """The GPU benchmark's logic at tiny sizes (the head part; TRL is reported if absent)."""
    import json

    proc = run_script("benchmarks/log_probs.py", "--cpu-smoke", "--no-e2e", "--providers",
                      "cutce", "trl", "--out", str(tmp_path))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    doc = json.loads((tmp_path / "log_probs_cpu.json").read_text())
    assert doc["benchmark"] == "log_probs" and doc["meta"]["device"] == "cpu"
    rows = doc["rows"]
    assert len(rows) == 6 and [r["provider"] for r in rows].count("cutce") == 1, rows  # 6 providers
    cutce_row = next(r for r in rows if r["provider"] == "cutce")
    assert cutce_row["fwd_ratio"] > 0 and cutce_row["dE_err"] < 1e-2  # bf16 inputs
    assert "| head | cutce | 512 |" in proc.stdout, proc.stdout
