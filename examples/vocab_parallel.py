"""Vocabulary-parallel loss with cutce: each rank holds a slice of the classifier's rows.

    torchrun --standalone --nproc_per_node=2 examples/vocab_parallel.py
    python examples/vocab_parallel.py            # one process (world size 1), no torchrun

Uses gloo on CPU and NCCL (one GPU per process) when CUDA is available. Every rank builds the same
data from a fixed seed, keeps its own slice of the weight (slices may be uneven), and calls
``linear_cross_entropy(..., vocab_group=...)``. The loss and the gradients are then checked
against the ordinary single-process call on the full weight, which every rank also computes
here; rank 0 prints both. The exit status is 1 when they differ.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from cutce import linear_cross_entropy


def main() -> int:
    if "RANK" not in os.environ:  # plain `python examples/vocab_parallel.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    status = run(rank, world, device)
    dist.barrier()  # every rank is done with its collectives before the group goes away
    dist.destroy_process_group()
    return status


def run(rank: int, world: int, device: torch.device) -> int:
    # The same data on every rank: hidden states (B, T, D), token ids (B, T), full weight (V, D).
    B, T, D, V = 2, 64, 32, 1001  # V not divisible by 2 or 4: uneven slices
    gen = torch.Generator().manual_seed(0)
    hidden_data = torch.randn(B, T, D, generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen).to(device)
    full_weight = (torch.randn(V, D, generator=gen) * D**-0.5).to(device)

    # This rank's slice, in rank order: the first V % world ranks get one row more.
    rows = [V // world + (r < V % world) for r in range(world)]
    start, stop = sum(rows[:rank]), sum(rows[:rank + 1])
    head = torch.nn.Parameter(full_weight[start:stop].clone())
    hidden = hidden_data.to(device).clone().requires_grad_()

    # Collective call: targets are global class ids; hidden and targets are the same on all ranks.
    loss = linear_cross_entropy(hidden, head, targets, shift=True, vocab_group=dist.group.WORLD)
    loss.backward()  # head.grad: this slice's gradient; hidden.grad: the full one, on every rank

    # Reference: the unsplit loss on one process (the full weight, no vocab_group).
    ref_hidden = hidden_data.to(device).clone().requires_grad_()
    ref_weight = full_weight.clone().requires_grad_()
    ref_loss = linear_cross_entropy(ref_hidden, ref_weight, targets, shift=True)
    ref_loss.backward()

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    # Largest relative error over the ranks (each rank checks its own slice of the weight grad).
    errors = torch.tensor([abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
                           rel(hidden.grad, ref_hidden.grad),
                           rel(head.grad, ref_weight.grad[start:stop])], device=device)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    tolerance = 1e-5 if device.type == "cpu" else 1e-4  # float32; GPU kernels sum in other orders
    ok = bool((errors < tolerance).all())
    if rank == 0:
        print(f"world={world} ({'nccl' if device.type == 'cuda' else 'gloo'}), "
              f"hidden {tuple(hidden.shape)}, V={V} split as {rows}")
        print(f"loss: vocab-parallel {loss.item():.6f}, single process {ref_loss.item():.6f}")
        print(f"relative errors: loss {errors[0]:.1e}, hidden.grad {errors[1]:.1e}, "
              f"weight.grad (per slice) {errors[2]:.1e}  ->  {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
