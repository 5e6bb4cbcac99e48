"""``torch.compile(model)`` of a patched transformers model (aot_eager on CPU: dynamo and
AOTAutograd trace exactly what inductor would, in seconds).

Against the unpatched compiled model: equal loss and gradients of every parameter, no graph break
beyond the model's own, no recompilation for new labels of the same shape, and the logit
transform still checked inside the compiled graph.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from torch._dynamo.utils import counters  # noqa: E402

from cutce import transformers as ct  # noqa: E402

VOCAB, T = 320, 12


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo(one_thread):  # one_thread: conftest.py
    yield
    torch._dynamo.reset()


def make_llama(**extra):
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
        initializer_range=0.2, **extra)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float().train()


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, -3:] = -100
    return ids, labels


def step(fn, params, ids, labels):
    for p in params.values():
        p.grad = None
    out = fn(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in params.items()}


def compiled_run(model, batches):
    """Fresh dynamo state; per batch (output, grads); then graph breaks and graphs compiled."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    params = dict(model.named_parameters())
    results = [step(compiled, params, *b) for b in batches]
    return results, sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def test_compiled_patched_model_matches_compiled_original():
    model = make_llama()
    batches = [batch(0), batch(1)]
    want, want_breaks, _ = compiled_run(model, batches)
    ct.patch(model)
    got, breaks, graphs = compiled_run(model, batches)
    assert breaks == want_breaks  # cutce adds no graph break
    assert graphs == 1  # the second batch (new labels, same shapes) reused the graph
    for (out_a, grads_a), (out_b, grads_b) in zip(want, got):
        assert out_b.logits is None and out_a.logits is not None
        torch.testing.assert_close(out_b.loss, out_a.loss, rtol=1e-5, atol=1e-6)
        assert grads_a.keys() == grads_b.keys()
        for name, ga in grads_a.items():
            torch.testing.assert_close(grads_b[name], ga, rtol=1e-5,
                                       atol=1e-5 * ga.abs().max().item() + 1e-9, msg=name)


def test_compiled_patched_model_still_refuses_an_unknown_logit_transform():
    # Llama's forward ignores final_logit_softcapping: the probe check (a custom op inside the
    # compiled graph) sees no softcap and raises the adapter's own error.
    # Patched after compiling this time: patch() reaches the compiled module's model.
    torch._dynamo.reset()
    compiled = ct.patch(torch.compile(make_llama(final_logit_softcapping=3.0), backend="aot_eager"))
    assert ct.is_patched(compiled) and ct.is_patched(compiled._orig_mod)
    ids, labels = batch(0)
    with pytest.raises(ct.UnsupportedModelError, match="LlamaForCausalLM.*transforms the logits"):
        compiled(input_ids=ids, labels=labels)
