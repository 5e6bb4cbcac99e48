"""Train a small patched causal LM under FSDP2 and record its loss curve (issue 7, item 2).

    torchrun --standalone --nproc_per_node=K scripts/fsdp_train.py --seed 0 --json out.json
    (add --cpu for gloo on CPU)

A random-init Llama (from a config, nothing downloaded) is patched with cutce.transformers and
sharded with `fully_shard` per decoder layer and at the root. The global batch is fixed (--batch
sequences of --seq tokens); each of the K ranks takes batch/K of it, so every world size trains on
the same data. The recorded loss is the global-batch mean (mean of the ranks' equal-size means).
scripts/fsdp_check.sh compares world sizes 1 and 2 against the seed-to-seed noise.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="model init seed (data seed is fixed)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    import cutce.transformers as ct

    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.cpu:
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    assert args.batch % world == 0, "the global batch must split evenly over the ranks"

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dev)
    ct.patch(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # Fixed data for every world size: a Zipf-like token stream, so the loss can fall.
    g = torch.Generator().manual_seed(1234)
    probs = 1.0 / torch.arange(1, args.vocab + 1, dtype=torch.float64)
    per = args.batch // world
    losses = []
    t0 = time.time()
    for step in range(args.steps):
        ids = torch.multinomial(probs, args.batch * args.seq, replacement=True, generator=g)
        ids = ids.view(args.batch, args.seq)[rank * per:(rank + 1) * per].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not args.cpu):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    elapsed = time.time() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    if rank == 0:
        print(f"world {world} seed {args.seed}: first loss {losses[0]:.4f}, last {losses[-1]:.4f}, "
              f"{elapsed / args.steps * 1e3:.0f} ms/step, peak {peak} MiB on rank 0", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world": world, "seed": args.seed, "losses": losses,
                           "ms_per_step": elapsed / args.steps * 1e3, "peak_mib_rank0": peak}, f)
    dist.destroy_process_group()
    # torch 2.13 + gloo sometimes aborts in interpreter teardown after all work is done
    # ("terminate called without an active exception"); skip the teardown (as dist_check.py does).
    os._exit(0)


if __name__ == "__main__":
    main()
