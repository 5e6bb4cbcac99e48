"""One training step of TRL's SFT, DPO and GRPO trainers with four LM heads, on one GPU.

    PYTHONPATH=src python benchmarks/trainers.py --out bench-out   # CUDA, bf16, real model shapes
    PYTHONPATH=src python benchmarks/trainers.py --cpu-smoke       # tiny float32 CPU run

Random weights from a config (nothing downloaded) with the shapes of Qwen2.5-0.5B (V=151936) and
Llama-3.2-1B (V=128256), tied embeddings, bf16, TRL's default gradient checkpointing
(``--no-grad-ckpt``). The same model, weights and batch go through four heads, a trainer each:

* ``trl-fused``: TRL's own ``add_fused_lm_head`` (``trl.kernels.ChunkedLogProbFunction``); TRL 1.16
  cannot turn it off (every trainer hooks its models unconditionally; ``use_liger_kernel`` only
  swaps layer kernels), hence the next mode;
* ``trl-plain``: a hook of the same contract, bound where TRL's is, computing every output from the
  model's own (B, T, V) bf16 logits (TRL's ``selective_log_softmax_and_entropy``, Triton on CUDA);
* ``cutce``: ``cutce.trl.patch()`` before the trainer is built, ``cutce.trl.unpatch()`` after;
* ``cutce-auto``: the same with ``memory_budget="auto"`` (logits kept where free memory holds them).

Timed after --warmup steps, on one fixed batch on the device, gradients set to None before each
step (outside the timing), ``torch.cuda.synchronize()`` around it:

* SFT, DPO: ``trainer.training_step`` (forward, loss, backward; no optimizer step) on the first
  batch of the trainer's own dataloader; DPO's includes its reference model (a frozen copy);
* GRPO: ``trainer.compute_loss`` + ``trainer.accelerator.backward`` (its ``training_step`` less
  ``_prepare_inputs``, which would generate again) on the micro-batch ``_prepare_inputs`` made
  once from GRPO's ``rollout_func`` (random ids of fixed lengths: no generation) and TRL's reward
  and advantage code. The policy is its own old policy and the group's advantages sum to 0: the
  loss is 0, not its gradient.

Per row: median ms per step; the CUDA allocator's peak over the timed steps (all of it: weights,
gradients, DPO's reference, the batch); the last loss; ``logp_err``, the max abs difference over
the scored tokens between this mode's ``model(..., fused_lm_head=True).log_probs`` (no_grad) and
float32 ``(h @ W.T / temperature).log_softmax(-1)`` at the labels, h the backbone's final hidden
states. Out of memory: status "oom". Writes trainers_<device>.json under --out after every row
(``trainers_<device>_<models>_<trainers>.json`` when filtered: split runs keep their files).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import importlib
import os
import statistics
import sys
import tempfile
import time
import types
import warnings

import torch

from cutce.bench import report

MODELS = {  # name -> (transformers classes, (hidden, layers, heads, kv heads, intermediate, V))
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", "Qwen2Config", (896, 24, 14, 2, 4864, 151936)),
    "llama3.2-1b": ("LlamaForCausalLM", "LlamaConfig", (2048, 16, 32, 8, 8192, 128256)),
}
TINY = (64, 2, 4, 2, 128, 1000)
SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "intermediate_size", "vocab_size")
TRAINERS, MODES = ("sft", "dpo", "grpo"), ("trl-fused", "trl-plain", "cutce", "cutce-auto")
GPU = dict(sft_batch=8, sft_seq=4096, dpo_pairs=4, dpo_seq=4096, grpo_gens=8, grpo_prompt=512,
           grpo_completion=1536)
CPU = dict(sft_batch=2, sft_seq=32, dpo_pairs=2, dpo_seq=32, grpo_gens=4, grpo_prompt=8,
           grpo_completion=16)
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0-2; "w<i>" is id i + 3; the last id is <unk>


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--cpu-smoke", action="store_true", help="--device cpu, tiny float32 models, 1+2 steps")
    for name, allowed in (("trainers", TRAINERS), ("models", MODELS), ("modes", MODES)):
        ap.add_argument(f"--{name}", default=",".join(allowed), help="comma-separated subset")
    for key, value in GPU.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"default {value}, {CPU[key]} on cpu")
    ap.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="no gradient checkpointing")
    ap.add_argument("--impl", default="auto", help="cutce impl")
    ap.add_argument("--memory-budget", type=lambda x: x if x == "auto" else float(x), default=None,
                    help="the cutce mode's memory_budget (cutce-auto: 'auto')")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.warmup, args.steps = "cpu", 1, 2
    for key, value in (GPU if args.device == "cuda" else CPU).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name, allowed in (("trainers", TRAINERS), ("models", tuple(MODELS)), ("modes", MODES)):
        chosen = [x for x in getattr(args, name).split(",") if x]
        if not chosen or set(chosen) - set(allowed):
            ap.error(f"--{name}: a comma-separated subset of {','.join(allowed)}")
        setattr(args, name, [x for x in allowed if x in chosen])
    return args


def build_model(name, args, device):
    import transformers

    model_cls, config_cls, shape = MODELS[name]
    longest = max(args.sft_seq, args.dpo_seq, args.grpo_prompt + args.grpo_completion)
    config = getattr(transformers, config_cls)(
        **dict(zip(SHAPE, TINY if args.cpu_smoke else shape)), tie_word_embeddings=True,
        max_position_embeddings=longest, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1B parameters on the host takes longer than the steps
        model = getattr(transformers, model_cls)(config)
    return model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).train()


def make_tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS, *(f"w{i}" for i in range(vocab - len(SPECIALS) - 1)), "<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def random_ids(count, length, vocab, seed):
    """count lists of `length` word ids (no special token: no sequence ends early)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIALS), vocab - 1, (count, length), generator=g).tolist()


def texts(count, length, vocab, seed):
    return [" ".join(f"w{i - len(SPECIALS)}" for i in row) for row in random_ids(count, length, vocab, seed)]


def plain_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
    """TRL's add_fused_lm_head contract, computed from the model's own (B, T, V) logits."""
    from trl.trainer.utils import FusedCausalLMOutput, selective_log_softmax_and_entropy

    original = model.forward

    def forward(self, *a, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw):
        if not fused_lm_head:
            extra = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return original(*a, **kw, **{k: v for k, v in extra.items() if v is not None})
        logits = original(*a, **dict(kw, use_cache=False)).logits
        logits, labels = (logits[:, :-1], labels[:, 1:]) if shift_labels is None else (logits, shift_labels)
        logits = logits.float() if cast_lm_head_to_fp32 else logits
        mask = labels != -100
        logp, entropy = selective_log_softmax_and_entropy(
            logits, labels.clamp(min=0), entropy_requires_grad="entropy" in outputs,
            temperature=temperature, row_mask=mask)
        fields = dict(log_probs=logp.masked_fill(~mask, 0.0),
                      entropy=entropy.masked_fill(~mask, 0.0) if "entropy" in outputs else None)
        metrics = dict(mean_logits=lambda z: (z.float() / temperature).mean(-1),
                       log_sum_sq_probs=lambda z: (2 * (z.float() / temperature).log_softmax(-1)).logsumexp(-1))
        with torch.no_grad():
            fields.update({k: _by_chunk(logits, fn, mask) for k, fn in metrics.items() if k in outputs})
            if "is_top1" in outputs:
                fields["is_top1"] = (logits.argmax(-1) == labels) & mask
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-fields["log_probs"].sum() / denom, label_mask=mask, **fields)

    model.forward = types.MethodType(forward, model)


def _by_chunk(logits, fn, mask, rows=1024):
    """fn over (rows, V) pieces of (B, T, V) logits: float32 temporaries stay a piece's size."""
    out = torch.cat([fn(piece) for row in logits for piece in row.split(rows)])
    return out.view(mask.shape).masked_fill(~mask, 0.0)


def _rebind(old, new):
    # Trainer modules import the name: binding it in trl.trainer.utils alone would miss them.
    for name, module in list(sys.modules.items()):
        held = vars(module).get("add_fused_lm_head") if module is not None else None
        if name.split(".")[0] == "trl" and held is old:
            module.add_fused_lm_head = new


@contextlib.contextmanager
def head_mode(mode, args):
    """A trainer built inside uses this mode's head."""
    import trl.trainer.utils

    import cutce.trl

    trl_hook = trl.trainer.utils.add_fused_lm_head
    with contextlib.ExitStack() as undo:
        if mode == "trl-plain":
            _rebind(trl_hook, plain_lm_head)
            undo.callback(_rebind, plain_lm_head, trl_hook)
        elif mode.startswith("cutce"):
            cutce.trl.patch(impl=args.impl, memory_budget="auto" if mode == "cutce-auto" else args.memory_budget)
            undo.callback(cutce.trl.unpatch)
        yield


def trainer_and_batch(kind, model, ref_model, tok, args, device):
    """(trainer, the timed step on a fixed batch, (input_ids, attention_mask, labels, temperature)
    of that batch for the log-prob check)."""
    import datasets
    import trl
    from transformers import TrainingArguments

    vocab = model.config.vocab_size
    renamed = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    common = dict(output_dir=tempfile.mkdtemp(prefix="cutce-trainers-"), max_steps=1, report_to="none",
                  save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=0,
                  logging_steps=1, bf16=device.type == "cuda", use_cpu=device.type == "cpu",
                  # transformers 5 renamed the flag, and warns about the old name
                  **{"activation_checkpointing" if renamed else "gradient_checkpointing": args.grad_ckpt})
    if kind == "sft":
        cfg = trl.SFTConfig(max_length=args.sft_seq, per_device_train_batch_size=args.sft_batch, **common)
        data = datasets.Dataset.from_dict({"text": texts(args.sft_batch, args.sft_seq, vocab, 1)})
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    elif kind == "dpo":
        prompt, n = args.dpo_seq // 4, args.dpo_pairs
        cfg = trl.DPOConfig(max_length=args.dpo_seq, per_device_train_batch_size=n, **common)
        # the leading space keeps the prompt's last word and the completion's first apart
        data = datasets.Dataset.from_dict({"prompt": texts(n, prompt, vocab, 2), **{
            key: [" " + t for t in texts(n, args.dpo_seq - prompt, vocab, seed)]
            for key, seed in (("chosen", 3), ("rejected", 4))}})
        trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=data,
                                 processing_class=tok)
    else:
        def rollout(prompts, _trainer):
            return dict(prompt_ids=random_ids(len(prompts), args.grpo_prompt, vocab, 5), logprobs=None,
                        completion_ids=random_ids(len(prompts), args.grpo_completion, vocab, 6))

        def reward(completion_ids, **_):  # varies within the group: the advantages are not 0
            return [float(sum(ids) % 17) for ids in completion_ids]

        cfg = trl.GRPOConfig(per_device_train_batch_size=args.grpo_gens, num_generations=args.grpo_gens,
                             max_completion_length=args.grpo_completion, **common)
        data = datasets.Dataset.from_dict({"prompt": ["w0 w1"] * args.grpo_gens})
        trainer = trl.GRPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                                  reward_funcs=reward, rollout_func=rollout)
    # Set by Trainer.train(), which is not run here: one micro-batch per optimizer step, and the
    # checkpointing that train() switches on (transformers 5 does it there, not in __init__).
    trainer.current_gradient_accumulation_steps = 1
    if args.grad_ckpt:
        kw = getattr(cfg, "activation_checkpointing_kwargs", None) or cfg.gradient_checkpointing_kwargs or None
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(0)  # GRPO shuffles the rollouts
    inputs = trainer._prepare_inputs(batch)
    if kind != "grpo":
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        labels = inputs["labels"] if kind == "sft" else ids.masked_fill(inputs["completion_mask"] == 0, -100)
        return trainer, lambda: trainer.training_step(model, dict(inputs)), (ids, mask, labels, 1.0)

    def step():
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, dict(inputs))
        trainer.accelerator.backward(loss)
        return loss.detach()

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :inputs["prompt_ids"].shape[1]] = -100
    return trainer, step, (ids, mask, labels, trainer.temperature)


def check_hooked(model, mode):
    """A TRL that stopped hooking the policy, or a rebinding that missed a trainer module, would
    time another head than the row's name says."""
    want = {"trl-fused": os.path.join("trl", "trainer", "utils.py"), "trl-plain": os.path.abspath(__file__),
            "cutce": os.path.join("cutce", "integrations", "trl")}[mode.removesuffix("-auto")]
    # The hooks copy the class forward's name and module (functools.wraps), so their code's file
    # tells them apart, along a chain of wrappers (accelerate's autocast one, say).
    fn, where = getattr(vars(model).get("forward"), "__func__", None), []
    while fn is not None and len(where) < 8:
        where.append(os.path.abspath(getattr(getattr(fn, "__code__", None), "co_filename", "?")))
        fn = getattr(fn, "__wrapped__", None)
    if not any(want in w for w in where):
        raise RuntimeError(f"{mode}: the policy's forward runs {where or 'its class'}, not {want}")


def timed(step, model, args, device):
    """(median ms, peak MiB or None, last loss) of the steps after the warmup ones."""
    cuda, times = device.type == "cuda", []
    sync = functools.partial(torch.cuda.synchronize, device) if cuda else (lambda: None)
    for i in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=True)
        sync()
        if i == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return statistics.median(times[args.warmup:]), peak, float(loss)


@torch.no_grad()
def logp_error(model, ids, mask, labels, temperature, chunk=2048):
    """Max abs error of this mode's per-token log-probs against float32 from the same hidden states."""
    got = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    valid = labels[:, 1:] != -100
    h, t, got = hidden[valid], labels[:, 1:][valid], got[valid].float()
    weight = model.get_output_embeddings().weight.float()
    ref = torch.cat([((h[s:s + chunk].float() @ weight.T) / temperature).log_softmax(-1)
                     .gather(1, t[s:s + chunk, None]).squeeze(1) for s in range(0, t.numel(), chunk)])
    return (got - ref).abs().max().item()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(kind, model, ref_model, tok, mode, args, device):
    row = dict(trainer=kind, mode=mode, status="ok", tokens=None, scored=None, ms=None, peak_mib=None,
               loss=None, logp_err=None)
    for m in filter(None, (model, ref_model)):  # each mode hooks an unhooked model
        vars(m).pop("forward", None)
    phase, oom = "step", None
    try:
        with head_mode(mode, args):
            trainer, step, check = trainer_and_batch(kind, model, ref_model, tok, args, device)
        check_hooked(model, mode)
        ckpt = next((getattr(model, a) for a in ("is_activation_checkpointing", "is_gradient_checkpointing")
                     if hasattr(type(model), a)), None)
        row.update(tokens=check[0].numel(), scored=int((check[2][:, 1:] != -100).sum()),
                   grad_ckpt=None if ckpt is None else bool(ckpt))
        row["ms"], row["peak_mib"], row["loss"] = timed(step, model, args, device)
        model.zero_grad(set_to_none=True)
        phase = "check"
        row["logp_err"] = logp_error(model, *check)
    except torch.OutOfMemoryError:
        oom = phase  # handled below, once the traceback no longer holds the step's tensors
    trainer = step = check = None
    model.zero_grad(set_to_none=True)
    free(device)
    if oom == "step":
        row.update(status="oom", ms=None, peak_mib=None, loss=None)
    elif oom == "check":
        row["note"] = "out of memory in the log-prob check"
    return row


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None):
    args = parse(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental
    import datasets
    import transformers
    import trl

    for kind in TRAINERS:  # loaded before a head is rebound in them
        importlib.import_module(f"trl.trainer.{kind}_trainer")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # renames inside TRL, once per trainer
    device = torch.device(args.device)
    meta = report.run_metadata(device)
    keys = (*GPU, "grad_ckpt", "impl", "memory_budget", "warmup", "steps")
    meta["setting"] = {**{k: getattr(args, k) for k in keys},
                       "dtype": "bfloat16" if device.type == "cuda" else "float32"}
    print(f"{meta['device_name']}; torch {meta['torch']}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}; {meta['setting']}", flush=True)
    filtered = (len(args.models), len(args.trainers)) != (len(MODELS), len(TRAINERS))
    suffix = "_" + "-".join(args.models) + "_" + "-".join(args.trainers) if filtered else ""
    path = os.path.join(args.out, f"trainers_{device.type}{suffix}.json")
    rows = []
    for name in args.models:
        model = build_model(name, args, device)
        tok = make_tokenizer(model.config.vocab_size)
        for kind in args.trainers:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False) if kind == "dpo" else None
            for mode in args.modes:
                rows.append(dict(model=name, **run_row(kind, model, ref_model, tok, mode, args, device)))
                r = rows[-1]
                print(f"{kind} {name} {mode}: {r['status']}, {r['tokens']} tokens, {fmt(r['ms'], '.1f')} "
                      f"ms/step, peak {fmt(r['peak_mib'], '.0f')} MiB, loss {fmt(r['loss'], '.5f')}, "
                      f"logp err {fmt(r['logp_err'], '.2e')}", flush=True)
                report.write_json(path, "trainers", meta, rows)  # a run cut short keeps its rows
            ref_model = None
            free(device)
        model = None
        free(device)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
