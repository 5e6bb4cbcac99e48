"""Offline distillation from a stored sparse teacher, on CPU in seconds.

1. The teacher runs once over the data and only its top-K token ids and log-probs per position
   are stored (here cut further to a ragged nucleus: the ids that make up 90% of its mass, at
   most K, padded with -100), instead of a V-wide distribution per position.
2. A student trains against that store with ``cutce.linear_sparse_distillation_loss``: the
   forward KL over the stored ids against the student's full-vocabulary softmax, plus a
   cross-entropy term on the data, without the student's (N, V) logits.

The first step's loss is checked against the same loss from the student's materialized logits.

    python examples/sparse_distillation.py
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn.functional as F

import cutce

torch.manual_seed(0)
V, D_TEACHER, D_STUDENT, K, T = 2000, 96, 48, 32, 2.0
B, SEQ, STEPS = 4, 64, 20
IGNORE = -100


def nucleus(logprobs: torch.Tensor, k: int, mass: float):
    """Top-k ids and log-probs per position, cut after the first ids whose probabilities reach
    ``mass``; the rest padded with IGNORE (a ragged list per position)."""
    lp, ids = logprobs.topk(k, dim=-1)
    before = lp.exp().cumsum(-1) - lp.exp()  # the mass of the ids ranked above each one
    cut = before >= mass
    return ids.masked_fill(cut, IGNORE), lp.masked_fill(cut, 0.0)


# ---- 1. the teacher, run once: its top-K per position goes to disk ---------------------------
tokens = torch.randint(0, V, (B, SEQ))
teacher_embed = torch.randn(V, D_TEACHER)
teacher_head = torch.randn(V, D_TEACHER) * 0.3
prior = -3.0 * torch.log1p(torch.arange(V, dtype=torch.float32))  # Zipf-like token frequencies
with torch.no_grad():
    context = teacher_embed[tokens]  # a bigram teacher: the next token from the current one
    logits = context @ teacher_head.T + prior
    logprobs = (logits / T).log_softmax(-1)  # the teacher at temperature T
    ids, lps = nucleus(logprobs, K, 0.9)
store = os.path.join(tempfile.mkdtemp(), "teacher_topk.pt")
torch.save({"ids": ids.int(), "logprobs": lps.half(), "temperature": T}, store)
kept = (ids != IGNORE).sum(-1).float()
print(f"stored the teacher's top-{K} (nucleus 0.9): {kept.mean():.1f} ids per position on "
      f"average ({kept.min():.0f}..{kept.max():.0f}), {os.path.getsize(store) / 2**10:.0f} KiB "
      f"instead of {B * SEQ * V * 2 / 2**20:.1f} MiB of float16 distributions")

# ---- 2. the student trains against the store -------------------------------------------------
saved = torch.load(store)
teacher_ids, teacher_logprobs = saved["ids"], saved["logprobs"]
embed = torch.nn.Embedding(V, D_STUDENT)
mix = torch.nn.Linear(D_STUDENT, D_STUDENT)
head = torch.nn.Linear(D_STUDENT, V)
opt = torch.optim.AdamW([*embed.parameters(), *mix.parameters(), *head.parameters()], lr=3e-3)


def student_hidden(tokens):
    context = embed(tokens).cumsum(1) / torch.arange(1, SEQ + 1)[:, None]
    return torch.tanh(mix(context))


def loss_fn(hidden):
    # Position t's stored distribution predicts token t + 1 (shift=True pairs them); the CE term
    # scores the same next tokens.
    return cutce.linear_sparse_distillation_loss(
        hidden, head.weight, teacher_ids, teacher_logprobs, tokens, bias=head.bias,
        temperature=saved["temperature"], ce_weight=0.1, shift=True)


for step in range(STEPS):
    hidden = student_hidden(tokens)
    loss = loss_fn(hidden)
    if step == 0:  # the same loss from the student's materialized (B, SEQ - 1, V) logits
        with torch.no_grad():
            z = head(hidden[:, :-1]).double()
            log_q = (z / T).log_softmax(-1)
            tid, tlp = teacher_ids[:, :-1].long(), teacher_logprobs[:, :-1].double()
            pad = tid == IGNORE
            p = tlp.exp().masked_fill(pad, 0.0)
            lq = log_q.gather(-1, tid.masked_fill(pad, 0))
            kl = (p * (tlp - lq)).sum(-1)
            ce = F.cross_entropy(z.transpose(1, 2), tokens[:, 1:], reduction="none")
            dense = (0.9 * kl + 0.1 * ce).mean()
        print(f"step 0: cutce {loss.item():.6f}, from materialized logits {dense.item():.6f}, "
              f"max |difference| {abs(loss.item() - dense.item()):.2e}")
        assert abs(loss.item() - dense.item()) < 1e-4
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 5 == 4:
        print(f"step {step + 1}: 0.9 KL(teacher top-K || student, T={T}) + 0.1 CE = {loss.item():.4f}")
print("OK")
