"""Scoring rollouts that a truncated sampler drew (top-k, top-p, min-p), on CPU in seconds.

1. A tiny random-init Llama generates completions with a vLLM-style sampler: temperature, then
   min-p, then top-k, then top-p (nucleus), and a draw from the renormalised kept set. The
   sampler's own log-prob of each drawn token is kept, as an inference engine reports it.
2. The learner scores the same tokens with ``cutce.transformers.token_log_probs`` and the same
   sampler settings: the truncated distribution's log-probs, without the (B, T, V) logits. They
   match the sampler's; the full softmax's log-probs are lower by the dropped mass, which would
   bias the importance ratio of a policy-gradient step.
3. One clipped policy-gradient step on the truncated log-probs.

    python examples/truncated_log_probs.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cutce.transformers import token_log_probs

torch.manual_seed(0)
V, PROMPT, NEW, B = 512, 8, 16, 4
SAMPLER = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02)  # as in SamplingParams

model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, initializer_range=0.2))


def sampler_step(logits, temperature, top_k, top_p, min_p):
    """One draw per row from the truncated distribution; returns (tokens, their log-probs)."""
    z = logits.float() / temperature
    p = z.softmax(-1)
    keep = p >= min_p * p.amax(-1, keepdim=True)
    kth = z.masked_fill(~keep, -torch.inf).topk(top_k, -1).values[:, -1:]
    keep &= z >= kth
    q = z.masked_fill(~keep, -torch.inf).softmax(-1)
    q_sorted, order = q.sort(-1)
    low = q_sorted.cumsum(-1) <= 1 - top_p
    low[:, -1] = False  # the most likely token always stays
    keep &= ~torch.zeros_like(keep).scatter(-1, order, low)
    logq = z.masked_fill(~keep, -torch.inf).log_softmax(-1)
    tokens = torch.multinomial(logq.exp(), 1)
    return tokens, logq.gather(-1, tokens)


# ---- 1. rollouts --------------------------------------------------------------------------
ids = torch.randint(3, V, (B, PROMPT))
rollout_logp = []
with torch.no_grad():
    for _ in range(NEW):
        token, logq = sampler_step(model(ids).logits[:, -1], **SAMPLER)
        ids = torch.cat([ids, token], dim=1)
        rollout_logp.append(logq)
rollout_logp = torch.cat(rollout_logp, dim=1)  # (B, NEW)

# ---- 2. the learner's log-probs of the same tokens ------------------------------------------
logp, entropy = token_log_probs(model, ids, logits_to_keep=NEW, return_entropy=True, **SAMPLER)
full = token_log_probs(model, ids, logits_to_keep=NEW, temperature=SAMPLER["temperature"])
outside = int(torch.isinf(logp).sum())
print(f"sampled tokens outside the learner's kept set: {outside}")
print(f"max |dlogp| against the sampler's log-probs: {(logp - rollout_logp).abs().max().item():.1e}")
print(f"mean log-prob: truncated {logp.mean().item():.3f}, full softmax {full.mean().item():.3f} "
      f"(ratio bias of the full softmax: x{(full - logp).exp().mean().item():.3f})")
assert outside == 0 and (logp - rollout_logp).abs().max() < 1e-4

# ---- 3. a clipped policy-gradient step --------------------------------------------------------
advantages = torch.randn(B, 1)
ratio = torch.exp(logp - rollout_logp)
loss = -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages).mean()
loss = loss - 1e-3 * entropy.mean()
loss.backward()
grad_norm = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
print(f"policy loss {loss.item():.4f}, gradient norm {grad_norm.item():.3f}")
assert torch.isfinite(grad_norm)
print("OK")
