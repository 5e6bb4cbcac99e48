"""TRL trainers on tiny random-initialised models, offline (a helper of test_trl.py and of
examples/trl_sft.py's test, not a test module; import it once trl is known to be installed).

The tokenizer is a word-level one built in memory: "w<i>" is token i + 3 (0-2 are pad, bos, eos),
so random texts of such words tokenize without downloads, and every id is below the tiny models'
vocabulary (hf_models.VOCAB).
"""

from __future__ import annotations

import tempfile

import torch

from hf_models import VOCAB, make_model

WORDS = VOCAB - 4  # "w0" ... : ids 3 .. VOCAB - 2; VOCAB - 1 is <unk>
# Keys of a trainer's log that measure time, not the computation.
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(WORDS)] + ["<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def texts(count, lo, hi, seed):
    """``count`` random texts of lo..hi-1 words."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (count,), generator=g)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, WORDS, (int(n),), generator=g))
            for n in lengths]


def datasets_for(kind, n=8):
    import datasets

    if kind == "sft":
        return datasets.Dataset.from_dict({"text": texts(4 * n, 5, 12, 0)})
    if kind == "dpo":
        return datasets.Dataset.from_dict({"prompt": texts(n, 3, 6, 1), "chosen": texts(n, 3, 7, 2),
                                           "rejected": texts(n, 2, 6, 3)})
    if kind == "kto":  # unpaired: desirable and undesirable completions alternate
        # the leading space keeps the prompt's last word and the completion's first apart
        completions = [" " + t for t in texts(n, 2, 7, 6)]
        return datasets.Dataset.from_dict({"prompt": texts(n, 3, 6, 5), "completion": completions,
                                           "label": [i % 2 == 0 for i in range(n)]})
    return datasets.Dataset.from_dict({"prompt": texts(n, 3, 6, 4)})


def low_word_reward(completions, **_):
    """Toy reward: the fraction of a completion's words from the lower half of the word list."""
    out = []
    for c in completions:
        words = c.split()
        low = sum(1 for w in words if w[1:].isdigit() and int(w[1:]) < WORDS // 2)
        out.append(low / max(len(words), 1))
    return out


def train(kind, family="llama", steps=2, model_config=None, during=None, prepare=None, **config):
    """Build a model from the seed (``model_config``: overrides of its config; ``prepare``: a
    function of it that returns the model to train, e.g. a patch), train ``steps`` steps with
    TRL's ``kind`` trainer ("sft"; "dpo" with LoRA; "grpo", "rloo" sampling from prompts with
    low_word_reward; "kto" on unpaired labelled completions) inside the context manager
    ``during`` if given; returns (logged dicts, {name: trainable parameter after training}, the
    trainer)."""
    import contextlib

    import trl

    model = make_model(family, **(model_config or {}))
    if prepare is not None:
        model = prepare(model)
    # Reference models are loaded from the policy's path: give it one on disk.
    path = tempfile.mkdtemp(prefix="cutce-trl-")
    model.save_pretrained(path)
    model.config._name_or_path = path
    common = dict(output_dir=tempfile.mkdtemp(prefix="cutce-trl-out-"), max_steps=steps,
                  per_device_train_batch_size=4, logging_steps=1, report_to="none",
                  save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False,
                  seed=0, bf16=False, optim="sgd", learning_rate=0.1)
    common.update(config)
    tok = make_tokenizer()
    if kind == "sft":
        args = trl.SFTConfig(max_length=16, **common)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets_for(kind),
                                 processing_class=tok)
    elif kind == "dpo":
        import peft

        args = trl.DPOConfig(**common)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets_for(kind),
                                 processing_class=tok, peft_config=lora)
    elif kind in ("grpo", "rloo"):
        config_cls, trainer_cls = ((trl.GRPOConfig, trl.GRPOTrainer) if kind == "grpo"
                                   else (trl.RLOOConfig, trl.RLOOTrainer))
        args = config_cls(num_generations=4, max_completion_length=6, **common)
        trainer = trainer_cls(model=model, args=args, train_dataset=datasets_for(kind),
                              processing_class=tok, reward_funcs=low_word_reward)
    elif kind == "kto":
        args = trl.KTOConfig(max_length=16, **common)
        trainer = trl.KTOTrainer(model=model, args=args, train_dataset=datasets_for(kind),
                                 processing_class=tok)
    else:
        raise ValueError(kind)
    with during or contextlib.nullcontext():
        trainer.train()
    logs = [{k: v for k, v in h.items() if k not in TIMING}
            for h in trainer.state.log_history if "loss" in h]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return logs, params, trainer
