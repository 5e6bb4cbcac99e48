"""Fine-tune with transformers' Trainer and cutce's loss: one line, no N x V logits.

A tiny Llama built from a config (random weights, no download) trains for a few steps on CPU;
a pretrained checkpoint is patched the same way, and without ``use_cpu=True`` the Triton kernels
run on the GPU. The same batch's loss is checked against the unpatched model's own.

    python examples/hf_trainer.py
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import cutce.transformers

torch.manual_seed(0)
config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = cutce.transformers.patch(LlamaForCausalLM(config))  # the one line

# A small in-memory dataset: a list of dicts is enough. The model shifts the labels itself.
ids = torch.randint(0, config.vocab_size, (32, 64))
train_set = [{"input_ids": x, "labels": x} for x in ids]

batch = ids[:4]
with torch.no_grad():
    ours = model(input_ids=batch, labels=batch).loss
    cutce.transformers.unpatch(model)
    theirs = model(input_ids=batch, labels=batch).loss  # the logits path, materialized
    cutce.transformers.patch(model)
print(f"loss before training: cutce {ours.item():.6f}, transformers {theirs.item():.6f}")
assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)

args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=8,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True)
trainer = Trainer(model=model, args=args, train_dataset=train_set)
result = trainer.train()
losses = [round(log["loss"], 4) for log in trainer.state.log_history if "loss" in log]
print(f"{result.global_step} steps with cutce's loss: {losses}")
print("OK")
