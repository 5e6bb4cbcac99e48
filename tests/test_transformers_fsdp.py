"""A patched model under FSDP2 (gloo, 2 CPU ranks), ``lm_head`` in the root unit or its own unit.

The common recipe shards every decoder layer, the head and the root separately. The patched
forward never calls the head module (a stand-in takes its place), so the loss must run as one of
the head unit's FSDP2 forward methods for its weight to be gathered, re-gathered in backward and
its gradient reduce-scattered. Checked for both layouts: each rank's loss equals the unpatched
single-process model's on that rank's batch, and every gathered gradient equals the mean over
ranks of the single-process gradients (what data parallelism computes), for two steps.
"""

from __future__ import annotations

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist

from spawn import finish_worker, run_workers

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-6)


def _model():
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=320, max_position_embeddings=64,
        initializer_range=0.2, tie_word_embeddings=False)  # a tied head cannot be its own unit
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float().train()


def _batches(step):
    """One (ids, labels) batch of 2 x 12 tokens per rank, the same on every rank."""
    g = torch.Generator().manual_seed(10 + step)
    out = []
    for r in range(WORLD):
        ids = torch.randint(3, 320, (2, 12), generator=g)
        labels = ids.clone()
        labels[r, :3 + r] = -100  # different masks per rank
        out.append((ids, labels))
    return out


def _step(layout, step, ref, model, rank):
    """One forward/backward of the sharded patched model against the unpatched reference."""
    failures = []
    batches = _batches(step)
    want_grads = {}
    for r, (ids, labels) in enumerate(batches):  # single process, unpatched
        ref.zero_grad(set_to_none=True)
        loss = ref(input_ids=ids, labels=labels).loss
        loss.backward()
        if r == rank:
            want_loss = loss.detach()
        for n, p in ref.named_parameters():
            want_grads[n] = want_grads.get(n, 0) + p.grad / WORLD
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batches[rank][0], labels=batches[rank][1])
    if out.logits is not None:
        failures.append(f"{layout}: the patched output has logits")
    out.loss.backward()
    try:
        torch.testing.assert_close(out.loss.detach(), want_loss, **TOL)
    except AssertionError as e:
        failures.append(f"{layout}, step {step}, loss: {e}")
    for n, p in model.named_parameters():
        try:
            torch.testing.assert_close(p.grad.full_tensor(), want_grads[n], **TOL)
        except AssertionError as e:
            failures.append(f"{layout}, step {step}, grad {n}: {str(e).splitlines()[:3]}")
    return failures


def _worker(rank, port, outdir):
    torch.set_num_threads(1)  # 2 processes share 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    failures = []
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        import cutce.transformers as ct

        mesh = init_device_mesh("cpu", (WORLD,))
        ref = _model()
        for layout in ("head unit", "head in root"):
            model = ct.patch(_model())
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            if layout == "head unit":
                fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh)
            for step in range(2):
                failures += _step(layout, step, ref, model, rank)
    except Exception:
        failures.append(traceback.format_exc(limit=6))
    finally:
        finish_worker(rank, outdir, failures)


def test_fsdp2_patched_model_equals_single_process(tmp_path):
    pytest.importorskip("transformers")
    per_rank = run_workers(_worker, (), WORLD, tmp_path, 120, "FSDP2 workers")
    failures = [f"rank {r}: {msg}" for r, msgs in enumerate(per_rank) for msg in msgs]
    assert not failures, "\n".join(failures[:10])
