"""cutce.trl.patch(truncation=...): the policy of a sampling trainer scored under its sampler's
top-k/top-p/min-p (float64 CPU where values are compared, tiny random models, offline).

A stand-in trainer calls TRL's hook from its __init__ as GRPO and RLOO do: the settings come from
its args (generation_kwargs over them), TRL's and vLLM's off values are off, an explicit mapping
replaces them, only the policy is truncated. The fused forward's values are the truncated
distribution's (cutce.linear_log_probs with the same settings where a token is kept; the kept set
plus the token where the learner drops it), against materialized logits, gradients included.
GRPO and RLOO train a step with it.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")
from trl.trainer import utils as trl_utils  # noqa: E402

import cutce  # noqa: E402
import cutce.trl as ctrl  # noqa: E402
from cutce.integrations.trl_sampler import Truncation  # noqa: E402
from cutce.integrations import trl_forward  # noqa: E402
from cutce.integrations.transformers.heads import transformers_model  # noqa: E402
from hf_models import T, VOCAB, make_model  # noqa: E402
from truncated_cases import kept_set, transformed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class GRPOConfig(types.SimpleNamespace):
    """A stand-in for TRL's, by name (the errors name the config class)."""


def sampler_args(**changes):
    """GRPOConfig's sampler fields at TRL's defaults (no truncation), with ``changes``."""
    return GRPOConfig(**{**dict(temperature=0.8, top_k=0, top_p=1.0, min_p=None,
                                           generation_kwargs=None, use_vllm=True), **changes})


class Sampling:
    """What GRPOTrainer.__init__ does with the hook: the policy (a PEFT model's base model) with
    entropy, then the reference."""

    def __init__(self, args, model, ref_model=None, beta=0.0):
        self.args, self.model, self.ref_model, self.beta = args, model, ref_model, beta
        trl_utils.add_fused_lm_head(transformers_model(model), temperature=args.temperature,
                                    outputs=("log_probs", "entropy"))
        if ref_model is not None:
            trl_utils.add_fused_lm_head(ref_model, temperature=args.temperature)


class SamplingBeforeTrainerInit:
    """The async GRPO trainer: it hooks the model before Trainer.__init__ stores self.args."""

    def __init__(self, model, args=None):
        args = sampler_args(top_p=0.5) if args is None else args
        trl_utils.add_fused_lm_head(model, temperature=args.temperature,
                                    outputs=("log_probs", "entropy"))


class NotSampling:
    """SFT, DPO, KTO: args without sampler settings."""

    def __init__(self, model):
        self.args = types.SimpleNamespace(temperature=1.0)
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))


def truncation_of(model):
    hook = getattr(vars(model).get("forward"), trl_forward.MARK, None)
    assert hook is not None, "not hooked by cutce"
    return hook.trunc


def build(truncation, make, *models, **kwargs):
    ctrl.patch(truncation=truncation)
    try:
        return make(*models, **kwargs)
    finally:
        ctrl.unpatch()


# --- which settings, which models ---------------------------------------------------------------

SETTINGS = {  # args changes -> the truncation read from them
    "trl_defaults": (dict(), None),
    "vllm_off_values": (dict(top_k=-1, top_p=1.0, min_p=0.0), None),
    "top_p": (dict(top_p=0.9), Truncation(top_p=0.9)),
    "all_three": (dict(top_k=20, top_p=0.95, min_p=0.05), Truncation(20, 0.95, 0.05)),
    "generation_kwargs_override": (dict(top_p=0.9, generation_kwargs={"top_k": 5, "top_p": 1.0}),
                                   Truncation(top_k=5)),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_sampler_settings_from_the_trainer(case):
    changes, expected = SETTINGS[case]
    policy, ref = make_model("llama"), make_model("llama", seed=1)
    build("sampler", Sampling, sampler_args(**changes), policy, ref)
    assert truncation_of(policy) == expected
    assert truncation_of(ref) is None  # the reference keeps the full softmax


def test_explicit_settings_replace_the_trainer_and_off_is_the_default():
    policy = make_model("llama")
    build({"top_k": 3, "min_p": 0.0}, Sampling, sampler_args(top_p=0.9), policy)
    assert truncation_of(policy) == Truncation(top_k=3)
    build(None, Sampling, sampler_args(top_p=0.9), policy)
    assert truncation_of(policy) is None
    ctrl.patch()  # the default: TRL's own numbers
    try:
        Sampling(sampler_args(top_p=0.9), policy)
    finally:
        ctrl.unpatch()
    assert truncation_of(policy) is None


def test_args_before_trainer_init_and_trainers_that_do_not_sample():
    policy = make_model("llama")
    build("sampler", SamplingBeforeTrainerInit, policy)
    assert truncation_of(policy) == Truncation(top_p=0.5)
    build({"top_p": 0.9}, NotSampling, policy)
    assert truncation_of(policy) is None
    ctrl.patch(truncation="sampler")
    try:  # a model hooked outside any trainer
        trl_utils.add_fused_lm_head(policy, outputs=("log_probs", "entropy"))
    finally:
        ctrl.unpatch()
    assert truncation_of(policy) is None


def test_peft_policy():
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"])
    policy = peft.get_peft_model(make_model("llama"), lora)
    build("sampler", Sampling, sampler_args(top_k=7), policy)
    assert truncation_of(policy.get_base_model()) == Truncation(top_k=7)
    with pytest.raises(ValueError, match="a PEFT adapter disabled"):  # TRL's reference with PEFT
        build("sampler", Sampling, sampler_args(top_k=7), policy, None, beta=0.05)


def test_refusals():
    model = make_model("llama")
    for bad, match in (("nucleus", "expected None, 'sampler' or a mapping"),
                       ({"top_q": 0.9}, r"keys among .*got \['top_q'\]"),
                       ({"top_k": -5}, "truncation: top_k: expected None or a positive int"),
                       ({"top_p": 1.5}, "truncation: top_p: expected a number <= 1.0")):
        with pytest.raises(ValueError, match=match):
            ctrl.patch(truncation=bad)
        assert not ctrl.is_patched()
    with pytest.raises(ValueError, match="impl: expected 'auto' or 'torch'"):
        ctrl.patch(truncation="sampler", impl="triton")
    with pytest.raises(ValueError, match="GRPOConfig's sampler settings: top_p: expected"):
        build("sampler", Sampling, sampler_args(top_p=-0.5), model)
    with pytest.raises(ValueError, match="expected beta=0 or a separate reference model"):
        build("sampler", Sampling, sampler_args(top_p=0.9), model, None, beta=0.04)
    with pytest.raises(ValueError, match="top-p before min-p"):
        build("sampler", Sampling, sampler_args(top_p=0.9, min_p=0.1, use_vllm=False), model)
    build("sampler", Sampling, sampler_args(top_p=0.9, use_vllm=False), model)  # one of them: fine
    with pytest.raises(ValueError, match="outputs: expected log_probs and entropy"):
        ctrl.add_fused_lm_head(model, outputs=("log_probs", "is_top1"), top_p=0.9)


# --- the values ---------------------------------------------------------------------------------


def batch(model):
    """Labels mixing tokens every sampler keeps (the argmax), tokens a tight truncation drops
    (random ones) and a prompt (-100)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, T), generator=g)
    with torch.no_grad():
        top = model(input_ids=ids).logits.argmax(-1)
    labels = ids.clone()
    labels[:, 1::2] = top[:, :-1:2]  # the argmax of the position before
    labels[:, :3] = -100
    return ids, labels


def reference(model, ids, labels, temperature, trunc):
    """Log-probs and entropy from materialized float64 logits over each kept set plus its token."""
    h = model.model(input_ids=ids).last_hidden_state[:, :-1]
    z = transformed(h.reshape(-1, h.shape[-1]), model.lm_head.weight, None, temperature=temperature)
    targets = labels[:, 1:].reshape(-1)
    valid = targets != -100
    keep = kept_set(z, trunc.top_k, trunc.top_p, trunc.min_p)
    dropped = valid & ~keep.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    keep[torch.arange(len(targets)), targets.clamp(min=0)] = True  # the token joins its kept set
    lsm = z.masked_fill(~keep, float("-inf")).log_softmax(-1)
    logp = torch.where(valid, lsm.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    entropy = torch.where(valid, -(lsm.exp() * lsm.masked_fill(~keep, 0.0)).sum(-1), 0.0)
    return logp.view(labels.shape[0], -1), entropy.view(labels.shape[0], -1), dropped.view(
        labels.shape[0], -1)


@pytest.mark.parametrize("settings", [dict(top_p=0.9), dict(top_k=4, min_p=0.05),
                                      dict(top_k=20, top_p=0.8, min_p=0.02)])
def test_values_and_gradients_against_materialized_logits(settings):
    temperature = 0.7
    model = make_model("llama").double()
    ids, labels = batch(model)
    build("sampler", Sampling, sampler_args(temperature=temperature, **settings), model)
    trunc = truncation_of(model)
    assert trunc == Truncation(**settings)

    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    (out.loss + 0.1 * out.entropy.sum()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logp, entropy, dropped = reference(model, ids, labels, temperature, trunc)
    mask = labels[:, 1:] != -100
    (-logp.sum() / mask.sum() + 0.1 * entropy.sum()).backward()

    assert dropped.any() and (mask & ~dropped).any()  # both kinds of tokens are scored
    assert torch.isfinite(out.log_probs).all() and torch.isfinite(out.entropy).all()
    torch.testing.assert_close(out.log_probs, logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, entropy, rtol=1e-10, atol=1e-10)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-8, atol=1e-10, msg=name)
    # Where the token is kept: exactly cutce.linear_log_probs with the same settings, which gives
    # -inf where it is dropped.
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state
        lp, ent = cutce.linear_log_probs(h, model.lm_head.weight, labels, shift=True,
                                         temperature=temperature, return_entropy=True, **settings)
    assert torch.equal(torch.isinf(lp), dropped)
    kept = mask & ~dropped
    torch.testing.assert_close(out.log_probs[kept], lp[kept], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.entropy[kept], ent[kept], rtol=1e-12, atol=1e-12)


def test_bf16_model_with_fp32_head():
    """A bf16 model with cast_lm_head_to_fp32 (GRPO's option): float32 values, all finite."""
    model = make_model("llama").to(torch.bfloat16)
    ids, labels = batch(model)
    ctrl.add_fused_lm_head(model, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"),
                           top_k=-1, top_p=0.7)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert out.log_probs.dtype == torch.float32 and torch.isfinite(out.log_probs).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- TRL's trainers ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_trainer_step(monkeypatch, kind):
    """A step of TRL's trainer sampling with top-p (transformers' generate), with a KL term: the
    policy's log-probs come from the truncated head, the reference's from the full softmax, and
    the logged loss and KL are finite."""
    pytest.importorskip("tokenizers")
    import trl_models

    calls = {"truncated": 0, "full": 0}
    real_sampled, real_full = trl_forward.sampled_log_probs, trl_forward.linear_log_probs

    def count(kind, real):
        return lambda *a, **k: calls.__setitem__(kind, calls[kind] + 1) or real(*a, **k)

    monkeypatch.setattr(trl_forward, "sampled_log_probs", count("truncated", real_sampled))
    monkeypatch.setattr(trl_forward, "linear_log_probs", count("full", real_full))
    ctrl.patch(truncation="sampler")
    try:
        logs, _, trainer = trl_models.train(kind, steps=1, top_p=0.8, top_k=50, beta=0.04)
    finally:
        ctrl.unpatch()
    assert truncation_of(transformers_model(trainer.model)) == Truncation(50, 0.8)
    assert trainer.ref_model is not None and truncation_of(trainer.ref_model) is None
    assert calls["truncated"] and calls["full"], calls
    assert logs and all(torch.isfinite(torch.tensor(v)).all() for k, v in logs[0].items()
                        if isinstance(v, float)), logs
