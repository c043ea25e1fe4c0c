"""What the transformers backend refuses, and how: multi-head latent attention with TilegraphCache
(at construction, pointing to the dynamic cache -- which serves it exactly), and query/key heads of
another size than value heads (before the first attention call), each an InputError."""

from __future__ import annotations

import pytest
import torch

from tilegraph.errors import InputError

MLA = dict(vocab_size=100, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
           qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
           first_k_dense_replace=2, max_position_embeddings=64, pad_token_id=0)  # fmt: skip


def deepseek_v3(hf, **overrides):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(DeepseekV3Config(**(MLA | overrides))).to(hf.DEVICE).eval()


def test_mla_refused_by_the_paged_cache_served_by_the_dynamic_one(hf):
    model = deepseek_v3(hf)
    model.set_attn_implementation(hf.NAME)
    with pytest.raises(InputError, match="latent attention.*dynamic cache"):
        hf.backend.TilegraphCache(model.config)
    ids, mask = hf.batch(hf.LEFT)
    expected = hf.greedy(model, "eager", ids, mask, new=3)
    assert hf.greedy(model, hf.NAME, ids, mask, new=3).equal(expected)


def test_qk_and_v_head_dims_that_differ_are_refused_before_attention(hf):
    model = deepseek_v3(hf, v_head_dim=8)
    ids, mask = hf.batch(hf.LEFT)
    with pytest.raises(InputError, match="qk_head_dim=16 != v_head_dim=8"):
        hf.logits(model, hf.NAME, ids, mask)
