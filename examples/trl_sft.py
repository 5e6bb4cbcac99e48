"""TRL's SFTTrainer with every LM-head quantity from cutce (CPU, seconds, nothing downloaded).

    python examples/trl_sft.py

``cutce.trl.patch()`` before the trainer is built replaces TRL's LM-head hook, so the trainer's
loss, its ``entropy`` and ``mean_token_accuracy`` metrics come from ``cutce.linear_log_probs``:
the (batch, seq, vocab) logits never exist. The model is a tiny random-init Llama and the data
random "sentences" over a word-level tokenizer built in memory; the run trains a few steps, then
checks one batch's fused loss against the loss computed from the model's own logits.
"""

from __future__ import annotations

import random
import tempfile

import datasets
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import cutce.trl

WORDS, STEPS = 500, 30


def make_tokenizer():
    """Word-level: "w<i>" is token i + 3; 0, 1, 2 are <pad>, <s>, </s>."""
    vocab = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(WORDS)] + ["<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def make_dataset(count=128, seed=0):
    """Sentences that count up from a random word: learnable, so the loss drops within steps."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        start, length = rng.randrange(WORDS - 16), rng.randrange(6, 14)
        texts.append(" ".join(f"w{start + i}" for i in range(length)))
    return datasets.Dataset.from_dict({"text": texts})


def main():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=WORDS + 4, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    tokenizer = make_tokenizer()

    cutce.trl.patch()  # before the trainer: it hooks the model while it is being built
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="cutce-trl-sft-"), max_steps=STEPS,
                     per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=5,
                     max_length=32, report_to="none", save_strategy="no", use_cpu=True,
                     bf16=False, disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=make_dataset(),
                         processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        print(f"step {h['step']:2d}  loss {h['loss']:.4f}  entropy {h['entropy']:.3f}  "
              f"token accuracy {h['mean_token_accuracy']:.3f}")

    # One batch through the hooked forward (cutce) and through the model's own logits.
    batch = tokenizer(["w10 w11 w12 w13 w14 w15", "w200 w201 w202 w203"], padding=True,
                      return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.eval()
    with torch.no_grad():
        fused = model(**batch, labels=labels, fused_lm_head=True)
        reference = model(**batch, labels=labels).loss  # no fused_lm_head: the original forward
    print(f"fused loss {fused.loss.item():.6f}, from the logits {reference.item():.6f}, "
          f"max |diff| {abs(fused.loss - reference).item():.2e}")
    cutce.trl.unpatch()
    assert abs(fused.loss - reference).item() < 1e-4
    assert logs[-1]["loss"] < logs[0]["loss"], "the loss did not drop"
    print("OK")


if __name__ == "__main__":
    main()
