"""A DPO loss on a tiny random-init Llama (CPU, seconds) with cutce's token log-probs.

    python examples/dpo_loss.py

Pairs of (chosen, rejected) completions share a prompt; the loss is

    -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

with each log pi(y | x) the sum of the completion's token log-probabilities (right padding
masked), under the policy and under a frozen reference copy. Chosen and rejected go through the
model in one batch. Every log-probability comes from ``cutce.transformers.token_log_probs``: the
(B, T, V) logits never exist. The first call is also checked against ``model(...).logits``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from cutce.transformers import token_log_probs

PAIRS, PROMPT_LEN, COMPLETION, VOCAB = 8, 10, 14, 4096
BETA, LR, STEPS = 0.1, 1e-3, 5
PAD = 0


def sequence_log_probs(model, ids, mask, completion_mask):
    """(B,) sum of log p(token) over each completion's real (unpadded) tokens."""
    logp = token_log_probs(model, ids, mask, logits_to_keep=COMPLETION)
    return (logp * completion_mask).sum(-1)


def main():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    policy = LlamaForCausalLM(config)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR)

    # A shared prompt per pair, two completions of different (right-padded) lengths.
    prompts = torch.randint(3, VOCAB, (PAIRS, PROMPT_LEN)).repeat(2, 1)   # chosen rows, then rejected
    completions = torch.randint(3, VOCAB, (2 * PAIRS, COMPLETION))
    lengths = torch.randint(4, COMPLETION + 1, (2 * PAIRS,))
    completion_mask = (torch.arange(COMPLETION) < lengths[:, None]).float()
    ids = torch.cat([prompts, completions.masked_fill(completion_mask == 0, PAD)], dim=1)
    mask = torch.cat([torch.ones_like(prompts), completion_mask.long()], dim=1)

    with torch.no_grad():
        ref_logp = sequence_log_probs(reference, ids, mask, completion_mask)
        logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1][:, -COMPLETION:]
        lsm = logits.float().log_softmax(-1).gather(-1, ids[:, -COMPLETION:, None])[..., 0]
        materialized = (lsm * completion_mask).sum(-1)
    for step in range(STEPS):
        logp = sequence_log_probs(policy, ids, mask, completion_mask)
        if step == 0:
            print(f"check vs model(...).logits + log_softmax: max |dlogp(sequence)| "
                  f"{(logp.detach() - materialized).abs().max():.1e} (sums of {COMPLETION} tokens)")
        chosen, rejected = (logp - ref_logp).split(PAIRS)
        margin = BETA * (chosen - rejected)
        loss = -F.logsigmoid(margin).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: DPO loss {loss.item():.4f}, reward margin {margin.mean().item():+.4f}, "
              f"accuracy {(margin > 0).float().mean().item():.2f}, "
              f"chosen logp {logp[:PAIRS].mean().item():.2f}, rejected logp {logp[PAIRS:].mean().item():.2f}")
    print(f"sequence log-probs shape {tuple(logp.shape)} = (chosen + rejected,); OK")


if __name__ == "__main__":
    main()
