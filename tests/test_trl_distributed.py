"""cutce.trl's hook on distributed heads (gloo, 2 CPU ranks, one spawn for every case).

(a) FSDP2 (``fully_shard`` on every decoder layer and the root; the head in the root unit or in a
unit of its own; with and without a LoRA adapter on the backbone), data parallel, trained: each
rank's fused outputs equal TRL's own hook in one process on that rank's batch, every gathered
gradient (``full_tensor``) equals the mean over ranks of the single-process gradients, and an SGD
step on the sharded parameters matches the same step in one process, for two steps. (b) Tensor parallel: ``ColwiseParallel`` on ``lm_head`` (a Shard(0) weight over the 2-rank
mesh), the same batch on both ranks: the outputs, the head's gathered gradient and the backbone's
gradients equal the single-process ones, as do those of a Replicate DTensor head; hidden states
that differ per rank raise on both ranks; ``RowwiseParallel`` (Shard(1)) is refused.
"""

from __future__ import annotations

import copy
import datetime
import traceback

import pytest
import torch
import torch.distributed as dist

from spawn import finish_worker, run_workers

pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("peft")

WORLD = 2
ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
HOOK = dict(temperature=0.8, outputs=ALL)
TOL = dict(rtol=1e-5, atol=1e-5)
LR = 0.5


def _model(lora):
    from hf_models import make_model

    model = make_model("llama", tie_word_embeddings=False)  # a tied head cannot be its own unit
    if not lora:
        return model
    import peft

    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                       target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained adapter, so that it changes the log-probs
    return model


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _batch(seed):
    from hf_models import T, VOCAB

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -(seed % 3 + 1):] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3 + seed % 2] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _fused(model, batch):
    """One fused call and its backward: (output, {name: gradient} of the trainable parameters)."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, fused_lm_head=True)
    (out.loss + 0.1 * out.entropy.sum()).backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _reference(model, batch):
    """TRL's own hook, one process."""
    from trl.trainer import utils as trl_utils

    twin = copy.deepcopy(model)
    trl_utils.add_fused_lm_head(_base(twin), **HOOK)
    return _fused(twin, batch)


def _compare(what, ref, got, failures):
    for field in ("loss",) + ALL + ("label_mask",):
        a, b = getattr(ref, field), getattr(got, field)
        try:
            assert a is not None and b is not None and a.dtype == b.dtype, (field, a, b)
            if a.dtype == torch.bool:
                assert torch.equal(a, b), field
            else:
                torch.testing.assert_close(b.detach(), a.detach(), **TOL)
        except AssertionError as e:
            failures.append(f"{what}, {field}: {str(e).splitlines()[:3]}")


def _compare_grads(what, want, got, failures):
    if want.keys() != got.keys() or not want:
        failures.append(f"{what}: gradients of {sorted(got)} vs {sorted(want)}")
        return
    for name, a in want.items():
        b = got[name]
        if b is None:
            failures.append(f"{what}, grad {name}: None")
            continue
        b = b.full_tensor() if hasattr(b, "full_tensor") else b
        try:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item() + 1e-9)
        except AssertionError as e:
            failures.append(f"{what}, grad {name}: {str(e).splitlines()[:3]}")


def _fsdp_case(layout, lora, mesh, rank, failures):
    from torch.distributed.fsdp import fully_shard

    import cutce.trl as ctrl

    what = f"FSDP2 {layout}{' + LoRA' if lora else ''}"
    ref_model = _model(lora)
    model = _model(lora)
    base = _base(model)
    ctrl.add_fused_lm_head(base, **HOOK)  # as TRL's trainers: hooked before accelerate shards
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout == "head unit":
        fully_shard(base.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(2):
        batches = [_batch(10 * step + r) for r in range(WORLD)]  # data parallel: one per rank
        want = {}
        for r, batch in enumerate(batches):
            out, grads = _reference(ref_model, batch)
            if r == rank:
                want_out = out
            for n, g in grads.items():
                want[n] = want.get(n, 0) + g / WORLD  # FSDP2 averages over the ranks
        got, grads = _fused(model, batches[rank])
        _compare(f"{what}, step {step}", want_out, got, failures)
        _compare_grads(f"{what}, step {step}", want, grads, failures)
        opt.step()  # the next step's outputs and gradients then check the update too
        with torch.no_grad():
            for n, p in ref_model.named_parameters():
                if n in want:
                    p -= LR * want[n]


def _tp_case(mesh, rank, failures):
    from torch.distributed.tensor import Shard, distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import cutce.trl as ctrl

    what = "ColwiseParallel head"
    ref_model = _model(False)
    model = _model(False)
    parallelize_module(model.lm_head, mesh, ColwiseParallel())
    if tuple(model.lm_head.weight.placements) != (Shard(0),):
        failures.append(f"{what}: weight placements {model.lm_head.weight.placements}")
    ctrl.add_fused_lm_head(model, **HOOK)
    for step in range(2):
        batch = _batch(20 + step)  # the same on both ranks
        want_out, want = _reference(ref_model, batch)
        got, grads = _fused(model, batch)
        if not hasattr(grads["lm_head.weight"], "full_tensor"):
            failures.append(f"{what}: the head's gradient is not a DTensor")
        _compare(f"{what}, step {step}", want_out, got, failures)
        _compare_grads(f"{what}, step {step}", want, grads, failures)
    try:  # a data-parallel batch on a vocabulary-sharded head
        model(**_batch(30 + rank), fused_lm_head=True)
        failures.append(f"{what}: hidden states that differ per rank did not raise")
    except ValueError as e:
        if "same hidden states on every rank" not in str(e):
            failures.append(f"{what}, different hidden states: {e}")
    rep = _model(False)  # a Replicate weight acts as the whole head
    distribute_module(rep.lm_head, mesh)
    ctrl.add_fused_lm_head(rep, **HOOK)
    batch = _batch(35)
    want_out, want = _reference(ref_model, batch)
    got, grads = _fused(rep, batch)
    _compare("Replicate head", want_out, got, failures)
    _compare_grads("Replicate head", want, grads, failures)
    row = _model(False)
    parallelize_module(row.lm_head, mesh, RowwiseParallel())
    ctrl.add_fused_lm_head(row, **HOOK)
    try:
        row(**_batch(40), fused_lm_head=True)
        failures.append("RowwiseParallel head: not refused")
    except ctrl.UnsupportedModelError as e:
        if "Shard(dim=1)" not in str(e):
            failures.append(f"RowwiseParallel head: {e}")


def _worker(rank, port, outdir):
    torch.set_num_threads(1)  # 2 processes share 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    failures = []
    try:
        import warnings

        from torch.distributed.device_mesh import init_device_mesh

        warnings.filterwarnings("ignore")
        mesh = init_device_mesh("cpu", (WORLD,))
        for layout, lora in (("head in root", False), ("head unit", False), ("head in root", True),
                             ("head unit", True)):
            _fsdp_case(layout, lora, mesh, rank, failures)
        _tp_case(mesh, rank, failures)
    except Exception:
        failures.append(traceback.format_exc(limit=8))
    finally:
        finish_worker(rank, outdir, failures)


def test_trl_hook_fsdp2_and_tensor_parallel_equal_single_process(tmp_path):
    per_rank = run_workers(_worker, (), WORLD, tmp_path, 150, "TRL distributed workers")
    failures = [f"rank {r}: {msg}" for r, msgs in enumerate(per_rank) for msg in msgs]
    assert not failures, "\n".join(failures[:12])
