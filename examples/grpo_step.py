"""A GRPO-style policy update on a tiny random-init Qwen2 (CPU, seconds) with cutce's token log-probs.

    python examples/grpo_step.py

Each iteration samples a group of completions per prompt, scores them with a toy reward (the
fraction of completion tokens in the lower half of the vocabulary), normalizes the rewards within
each group (the advantages), and takes a few clipped-ratio steps against the rollout policy's
log-probabilities, with a KL penalty towards a frozen reference model. Every log-probability
comes from ``cutce.transformers.token_log_probs``: the (B, T, V) logits never exist. The first
call is also checked against ``model(...).logits`` + ``log_softmax``.
"""

from __future__ import annotations

import copy

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from cutce.transformers import token_log_probs

PROMPTS, GROUP, PROMPT_LEN, COMPLETION = 4, 4, 8, 12
TEMPERATURE, CLIP, BETA, LR = 0.9, 0.2, 0.04, 1e-3
ITERATIONS, STEPS_PER_ITERATION = 3, 2
PAD, EOS, VOCAB = 0, 2, 2048


def reward(completions, mask):
    """Toy verifiable reward: the fraction of (unmasked) completion tokens below vocab_size / 2."""
    low = (completions < VOCAB // 2).float() * mask
    return low.sum(-1) / mask.sum(-1).clamp(min=1)


def completion_mask(completions):
    """1 up to and including the first EOS, 0 after it (what the policy is trained on)."""
    eos = (completions == EOS).int()
    return (eos.cumsum(-1) - eos == 0).float()


def check_against_logits(model, ids, mask, keep):
    logp, entropy = token_log_probs(model, ids, mask, logits_to_keep=keep,
                                    temperature=TEMPERATURE, return_entropy=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][:, -keep:]
        lsm = (logits / TEMPERATURE).float().log_softmax(-1)
        ref = lsm.gather(-1, ids[:, -keep:, None])[..., 0]
        ref_entropy = -(lsm.exp() * lsm).sum(-1)
    print(f"check vs model(...).logits + log_softmax: max |dlogp| {(logp - ref).abs().max():.1e}, "
          f"max |dentropy| {(entropy - ref_entropy).abs().max():.1e}")


def main():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    policy = Qwen2ForCausalLM(config)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR)

    # Left-padded prompts of different lengths, each repeated GROUP times.
    lengths = torch.randint(3, PROMPT_LEN + 1, (PROMPTS,))
    prompts = torch.randint(3, VOCAB, (PROMPTS, PROMPT_LEN))
    prompt_mask = (torch.arange(PROMPT_LEN) >= PROMPT_LEN - lengths[:, None]).long()
    prompts = prompts.masked_fill(prompt_mask == 0, PAD)
    prompts, prompt_mask = (x.repeat_interleave(GROUP, 0) for x in (prompts, prompt_mask))

    for it in range(ITERATIONS):
        policy.eval()
        with torch.no_grad():
            ids = policy.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True,
                                  temperature=TEMPERATURE, top_k=None, top_p=None,
                                  max_new_tokens=COMPLETION, pad_token_id=PAD)
        completions = ids[:, PROMPT_LEN:]  # generate pads after EOS; it stops early if all ended
        cmask = completion_mask(completions)
        mask = torch.cat([prompt_mask, cmask.long()], dim=1)
        keep = completions.shape[1]  # score only the completion tokens
        rewards = reward(completions, cmask)
        grouped = rewards.view(PROMPTS, GROUP)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        policy.train()
        if it == 0:
            check_against_logits(policy, ids, mask, keep)
        with torch.no_grad():  # log-probs of the rollout policy and of the reference, once per batch
            old_logp = token_log_probs(policy, ids, mask, logits_to_keep=keep, temperature=TEMPERATURE)
            ref_logp = token_log_probs(reference, ids, mask, logits_to_keep=keep, temperature=TEMPERATURE)
        for step in range(STEPS_PER_ITERATION):
            logp, entropy = token_log_probs(policy, ids, mask, logits_to_keep=keep,
                                            temperature=TEMPERATURE, return_entropy=True)
            ratio = torch.exp(logp - old_logp)
            surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - CLIP, 1 + CLIP) * advantages)
            kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1  # k3 estimator, >= 0
            per_token = -(surrogate - BETA * kl)
            loss = ((per_token * cmask).sum(-1) / cmask.sum(-1).clamp(min=1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            clipped = (((ratio - 1).abs() > CLIP).float() * cmask).sum() / cmask.sum()
            print(f"iteration {it} step {step}: loss {loss.item():+.4f}, reward {rewards.mean().item():.3f}, "
                  f"mean ratio {(ratio * cmask).sum().item() / cmask.sum().item():.4f}, clipped {clipped.item():.2f}, "
                  f"kl {(kl * cmask).sum().item() / cmask.sum().item():.2e}, "
                  f"entropy {(entropy * cmask).sum().item() / cmask.sum().item():.3f} nats")
    print(f"logp shape {tuple(logp.shape)} = (prompts x group, completion tokens); OK")


if __name__ == "__main__":
    main()
