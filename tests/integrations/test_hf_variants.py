"""The transformers backend's variants, one model per feature (transformers' own model code, tiny
random weights): sliding windows (Mistral, window 3 < the prompt), soft-caps on alternating
window/full layers (Gemma2, cap 0.02), GPT-OSS sinks (per-layer ``s_aux``). Each matches eager
attention on left- and right-padded prefill logits and greedy tokens with every cache, and each
shows the reference moves when its feature is switched off (so the match is not vacuous)."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

from tilegraph.decode import BatchDecode
from tilegraph.errors import InputError
from tilegraph.prefill import BatchPrefill, BatchPrefillRagged


@pytest.fixture
def plan_calls(monkeypatch, hf) -> dict[str, int]:
    """Counts plan() calls per attention class (the cached objects are dropped first)."""
    hf.backend.clear_attention_objects()
    calls: dict[str, int] = {}
    for cls, label in ((BatchPrefillRagged, "ragged"), (BatchPrefill, "paged"), (BatchDecode, "decode")):
        def counted(self, *args, _plan=cls.plan, _label=label, **kwargs):
            calls[_label] = calls.get(_label, 0) + 1
            return _plan(self, *args, **kwargs)

        monkeypatch.setattr(cls, "plan", counted)
    return calls


def check_against_eager(hf, model, off_model) -> None:
    """Prefill logits (left and right padding; no cache, the static cache, TilegraphCache) and greedy
    tokens (dynamic, static, paged) equal eager's; the model with the feature off gives other logits."""
    for rows in (hf.LEFT, hf.RIGHT):
        ids, mask = hf.batch(rows)
        expected = hf.logits(model, "eager", ids, mask)
        hf.assert_logits_close(hf.logits(model, hf.NAME, ids, mask), expected, mask)
        static = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 2)
        hf.assert_logits_close(hf.logits(model, hf.NAME, ids, mask, cache=static), expected, mask)
        hf.assert_logits_close(hf.logits(model, hf.NAME, ids, mask, cache=hf.paged_cache(model)), expected, mask)
        assert hf.differs(hf.logits(off_model, "eager", ids, mask), expected, mask)
    ids, mask = hf.batch(hf.LEFT)
    tokens = hf.greedy(model, "eager", ids, mask, new=4)
    assert hf.greedy(model, hf.NAME, ids, mask, new=4).equal(tokens)
    assert hf.greedy(model, hf.NAME, ids, mask, new=4, cache_implementation="static").equal(tokens)
    assert hf.greedy(model, hf.NAME, ids, mask, new=4, cache=hf.paged_cache(model)).equal(tokens)


def test_sliding_window_mistral(hf):
    check_against_eager(hf, hf.tiny("mistral-window"), hf.tiny("mistral-window", sliding_window=None))


def test_soft_cap_on_alternating_layers_gemma2(hf, plan_calls):
    model = hf.tiny("gemma2-cap0.02")
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    ids, mask = hf.batch(hf.LEFT)
    hf.logits(model, hf.NAME, ids, mask)
    assert plan_calls == {"ragged": 2}  # one object and one plan per layer kind, not one per layer call
    check_against_eager(hf, model, hf.tiny("gemma2-cap0.02", attn_logit_softcapping=None))


def test_sinks_gpt_oss(hf):
    model = hf.tiny("gpt-oss")
    off = hf.tiny("gpt-oss")
    with torch.no_grad():
        for layer in off.model.layers:
            layer.self_attn.sinks.fill_(-1e4)  # exp(-1e4) = 0: no sink
    check_against_eager(hf, model, off)


def test_window_over_a_gap_dense_exact_paged_refused(hf):
    """Right padding, then a decode step: the window spans padding inside row 0. The dense path reads
    only what the mask lets each query see (exact); the paged cache, which stores the real tokens
    back to back, would see further, so it refuses."""
    from transformers import DynamicCache

    model = hf.tiny("mistral-window", seed=2)
    ids, mask = hf.batch(hf.RIGHT)
    step_ids = torch.tensor([[7], [8]], device=hf.DEVICE)
    step_mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)

    def decode_logits(implementation, cache):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, cache=cache)
            return model(input_ids=step_ids, attention_mask=step_mask, cache=cache).logits.float()

    expected = decode_logits("eager", DynamicCache(config=model.config))
    actual = decode_logits(hf.NAME, DynamicCache(config=model.config))
    hf.assert_logits_close(actual, expected, torch.ones(2, 1, device=hf.DEVICE))
    with pytest.raises(InputError, match="sliding window of 3"):
        decode_logits(hf.NAME, hf.paged_cache(model))


class _Module(torch.nn.Module):
    num_key_value_groups = 2
    scaling = 0.25
    is_causal = True
    layer_idx = 0


def test_s_aux_error_names_its_shape_not_its_values(hf):
    q = torch.randn(1, 4, 3, 16, device=hf.DEVICE)
    kv = torch.randn(1, 2, 3, 16, device=hf.DEVICE)
    with torch.no_grad(), pytest.raises(InputError) as error:
        hf.backend.tilegraph_attention(_Module(), q, kv, kv.clone(), None, s_aux=torch.randn(7, device=hf.DEVICE))
    message = str(error.value)
    assert "s_aux" in message and "shape=[7]" in message and "[4]" in message
    assert "tensor(" not in message


@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_bad_sliding_window_raises(hf, value):
    q = torch.randn(1, 4, 3, 16, device=hf.DEVICE)
    kv = torch.randn(1, 2, 3, 16, device=hf.DEVICE)
    with torch.no_grad(), pytest.raises(InputError, match="sliding_window="):
        hf.backend.tilegraph_attention(_Module(), q, kv, kv.clone(), None, sliding_window=value)


def test_soft_cap_zero_means_none(hf):
    """softcap=0 (FlashInfer's convention) is plain attention: the same output as softcap=None."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 16, device=hf.DEVICE)
    k, v = torch.randn(2, 2, 5, 16, device=hf.DEVICE), torch.randn(2, 2, 5, 16, device=hf.DEVICE)
    with torch.no_grad():
        plain, _ = hf.backend.tilegraph_attention(_Module(), q, k, v, None, softcap=None)
        zero, _ = hf.backend.tilegraph_attention(_Module(), q, k, v, None, softcap=0)
        capped, _ = hf.backend.tilegraph_attention(_Module(), q, k, v, None, softcap=0.05)
    assert torch.isfinite(plain).all() and plain.equal(zero)
    assert not torch.allclose(capped, plain, atol=1e-3)
