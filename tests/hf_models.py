"""Tiny random-initialised Hugging Face models built from configs (nothing is downloaded), for
the transformers tests. Import it only once transformers is known to be installed."""

from __future__ import annotations

import pytest
import torch
import transformers

VOCAB, T = 320, 12
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2,
              # Large enough init that the logits are O(1): softcap and scale then matter.
              initializer_range=0.2)
MOE = dict(output_router_logits=True, router_aux_loss_coef=0.1, num_experts_per_tok=2)
QWEN_MOE = dict(MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                decoder_sparse_step=1, mlp_only_layers=[])
# family -> (model class, config class, config overrides that make its logit handling visible)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"final_logit_softcapping": 1.5}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {"final_logit_softcapping": 1.5}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {}),
    "cohere": ("CohereForCausalLM", "CohereConfig", {"logit_scale": 2.5}),
    "granite": ("GraniteForCausalLM", "GraniteConfig", {"logits_scaling": 4.0}),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(MOE, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", QWEN_MOE),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", QWEN_MOE),
}


def make_model(family, seed=0, **extra):
    model_name, config_name, overrides = FAMILIES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, config_name)(**{**COMMON, **overrides, **extra})
    for key, value in list(config.to_dict().items()):
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)  # gradients must be comparable between two calls
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).float().train()
