"""tilegraph as a transformers attention backend: a tiny random-weight Llama matches transformers'
own sdpa attention (logits of padded batches, greedy tokens with the dynamic and the paged cache),
plans once per forward, and refuses what it cannot serve."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import tilegraph  # noqa: E402
from tilegraph.decode import BatchDecode  # noqa: E402
from tilegraph.errors import InputError, StateError  # noqa: E402
from tilegraph.integrations import transformers as hf  # noqa: E402
from tilegraph.prefill import BatchPrefill, BatchPrefillRagged  # noqa: E402

DEVICE = torch.device("cpu" if tilegraph.SIMULATOR else "cuda")
NAME = hf.register()

LEFT_PADDED = ([[0, 0, 5, 6, 7], [3, 4, 5, 6, 9], [0, 8, 2, 4, 1]], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
RIGHT_PADDED = ([[5, 6, 7, 0, 0], [3, 4, 5, 6, 9]], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """2 layers, hidden 64, 4 query heads / 2 KV heads of 16, vocab 100; random weights."""
    fields = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(fields | overrides)))
    return model.to(device=DEVICE, dtype=dtype).eval()


def batch(rows: tuple[list[list[int]], list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(rows[0], device=DEVICE), torch.tensor(rows[1], device=DEVICE)


def logits(model: LlamaForCausalLM, implementation: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def greedy(model: LlamaForCausalLM, implementation: str, ids: torch.Tensor, mask: torch.Tensor, new: int, **kwargs) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **kwargs)


@pytest.fixture
def plan_calls(monkeypatch) -> dict[str, int]:
    """Counts plan() calls per attention class (the cached objects are dropped first)."""
    hf.clear_attention_objects()
    calls: dict[str, int] = {}
    for cls, label in ((BatchPrefillRagged, "ragged"), (BatchPrefill, "paged"), (BatchDecode, "decode")):
        def counted(self, *args, _plan=cls.plan, _label=label, **kwargs):
            calls[_label] = calls.get(_label, 0) + 1
            return _plan(self, *args, **kwargs)

        monkeypatch.setattr(cls, "plan", counted)
    return calls


@pytest.mark.parametrize("rows", [LEFT_PADDED, RIGHT_PADDED], ids=["left", "right"])
def test_padded_logits_match_sdpa(rows, plan_calls):
    model = tiny_llama()
    ids, mask = batch(rows)
    expected = logits(model, "sdpa", ids, mask)
    actual = logits(model, NAME, ids, mask)
    real = mask.bool()
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-4, atol=1e-4)
    assert plan_calls == {"ragged": 1}  # one plan for the forward, shared by both layers


def test_greedy_tokens_match_sdpa_dynamic_cache(plan_calls):
    model = tiny_llama(seed=1)
    ids, mask = batch(LEFT_PADDED)
    expected = greedy(model, "sdpa", ids, mask, new=3)
    plan_calls.clear()
    assert torch.equal(greedy(model, NAME, ids, mask, new=3), expected)
    assert plan_calls == {"ragged": 1, "decode": 2}  # prompt, then one decode plan per generated token


def test_greedy_tokens_match_sdpa_paged_cache(plan_calls):
    model = tiny_llama(seed=2)
    ids, mask = batch(LEFT_PADDED)
    expected = greedy(model, "sdpa", ids, mask, new=3)
    plan_calls.clear()
    model.set_attn_implementation(NAME)
    cache = hf.TilegraphCache(model.config, max_num_pages=16, page_size=4)
    assert torch.equal(greedy(model, NAME, ids, mask, new=3, cache=cache), expected)
    assert plan_calls == {"paged": 1, "decode": 2}
    # padding is never stored: each row holds its real prompt tokens and the 2 fed-back tokens
    assert [cache.pool.kv_len(row) for row in range(3)] == [3 + 2, 5 + 2, 4 + 2]
    assert cache.get_seq_length() == 5 + 2


def test_paged_cache_with_static_mask_sizes_matches_sdpa():
    """TilegraphCache(max_cache_len=...): masks of a fixed width, queries at cache_position (the
    compile-friendly mode), the length a tensor; the same tokens as sdpa."""
    model = tiny_llama(seed=5)
    ids, mask = batch(LEFT_PADDED)
    expected = greedy(model, "sdpa", ids, mask, new=3)
    model.set_attn_implementation(NAME)
    cache = hf.TilegraphCache(model.config, max_num_pages=16, page_size=4, max_cache_len=10)
    assert cache.is_compileable and cache.get_mask_sizes(1, 0) == (10, 0)
    assert torch.equal(greedy(model, NAME, ids, mask, new=3, cache=cache), expected)
    assert int(cache.get_seq_length()) == 5 + 2


@pytest.mark.parametrize("kind", ["dynamic", "paged", "static"])
def test_chunked_prefill_over_a_cache_matches_one_pass(kind):
    """3 prompt tokens, then 2 more over the cache (prefill with a past), with an all-padding row;
    the static cache's queries sit at cache_position inside max_cache_len, not at the end."""
    from transformers import DynamicCache, StaticCache

    model = tiny_llama(seed=4)
    ids, mask = batch(([[0, 5, 6, 7, 8], [3, 4, 5, 6, 9], [0, 0, 0, 0, 0]], [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]))
    expected = logits(model, "sdpa", ids, mask)
    model.set_attn_implementation(NAME)
    caches = {
        "dynamic": lambda: DynamicCache(config=model.config),
        "paged": lambda: hf.TilegraphCache(model.config, max_num_pages=16, page_size=4),
        "static": lambda: StaticCache(config=model.config, max_cache_len=9),
    }
    cache = caches[kind]()
    with torch.no_grad():
        first = model(input_ids=ids[:, :3], attention_mask=mask[:, :3], cache=cache).logits
        second = model(input_ids=ids[:, 3:], attention_mask=mask, cache=cache).logits
    actual = torch.cat([first, second], dim=1)
    real = mask.bool()
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-4, atol=1e-4)


def test_bf16_logits_within_bf16_tolerance():
    model = tiny_llama(dtype=torch.bfloat16, seed=3)
    ids, mask = batch(LEFT_PADDED)
    expected = logits(model, "sdpa", ids, mask)
    actual = logits(model, NAME, ids, mask)
    real = mask.bool()
    scale = expected[real].abs().max()
    assert (actual[real] - expected[real]).abs().max() <= 3e-2 * scale


# ---- refusals ----------------------------------------------------------------------------------


def test_dropout_in_training_mode_raises():
    model = tiny_llama(attention_dropout=0.1)
    model.set_attn_implementation(NAME)
    model.train()
    ids, mask = batch(LEFT_PADDED)
    with torch.no_grad(), pytest.raises(InputError, match="dropout"):
        model(input_ids=ids, attention_mask=mask)


def test_output_attentions_raises():
    model = tiny_llama()
    model.set_attn_implementation(NAME)
    ids, mask = batch(LEFT_PADDED)
    with torch.no_grad(), pytest.raises(InputError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_custom_non_causal_mask_raises():
    model = tiny_llama()
    model.set_attn_implementation(NAME)
    ids, _ = batch(RIGHT_PADDED)
    full = torch.ones(2, 1, 5, 5, dtype=torch.bool, device=DEVICE)  # bidirectional: every query sees every key
    with torch.no_grad(), pytest.raises(InputError, match="not a causal mask"):
        model(input_ids=ids, attention_mask=full)


def test_additive_bias_mask_raises():
    model = tiny_llama()
    model.set_attn_implementation(NAME)
    ids, _ = batch(RIGHT_PADDED)
    bias = torch.full((2, 1, 5, 5), 0.5, device=DEVICE)
    with torch.no_grad(), pytest.raises(InputError, match="bias"):
        model(input_ids=ids, attention_mask=bias)


def test_gradients_raise():
    model = tiny_llama()
    model.set_attn_implementation(NAME)
    ids, mask = batch(LEFT_PADDED)
    with pytest.raises(InputError, match="no backward"):
        model(input_ids=ids, attention_mask=mask)


def test_paged_cache_needs_the_tilegraph_backend():
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    with pytest.raises(InputError, match="TilegraphCache needs"):
        hf.TilegraphCache(model.config)


def test_paged_cache_refuses_a_second_batch():
    model = tiny_llama()
    ids, mask = batch(LEFT_PADDED)
    model.set_attn_implementation(NAME)
    cache = hf.TilegraphCache(model.config, max_num_pages=16, page_size=4)
    greedy(model, NAME, ids, mask, new=1, cache=cache)
    with pytest.raises(InputError, match="batch changed"):
        greedy(model, NAME, ids[:2], mask[:2], new=1, cache=cache)


def test_paged_cache_update_without_the_backend_raises():
    model = tiny_llama()
    model.set_attn_implementation(NAME)
    cache = hf.TilegraphCache(model.config, max_num_pages=16, page_size=4)
    keys = torch.zeros(1, 2, 3, 16, device=DEVICE)
    cache.update(keys, keys.clone(), 0)
    with pytest.raises(StateError, match="updated twice"):
        cache.update(keys.clone(), keys.clone(), 0)


@pytest.mark.parametrize("name", ["flash_tilegraph", "my/sdpa", "eager", ""])
def test_reserved_names_raise(name):
    with pytest.raises(InputError, match="name="):
        hf.register(name)


# ---- GPU: a realistic size -----------------------------------------------------------------------


@pytest.mark.gpu
def test_realistic_llama_matches_sdpa_on_gpu():
    """1B-class layer shapes (32 query / 8 KV heads of 64), 4 layers, skewed left-padded prompts."""
    model = tiny_llama(
        dtype=torch.float32, vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
    )  # fmt: skip
    lengths = [512, 200, 37, 1]
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(1, 32000, (length,), generator=generator)
        mask[row, -length:] = 1
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    real = mask.bool()
    torch.testing.assert_close(logits(model, NAME, ids, mask)[real], logits(model, "sdpa", ids, mask)[real], rtol=2e-3, atol=2e-3)
    timings, outputs = {}, {}
    for label, implementation, paged in (("sdpa", "sdpa", False), ("tilegraph", NAME, False), ("paged", NAME, True)):
        model.set_attn_implementation(implementation)
        kwargs = {"cache": hf.TilegraphCache(model.config, max_num_pages=512, page_size=16)} if paged else {}
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs[label] = greedy(model, implementation, ids, mask, new=16, **kwargs)
        torch.cuda.synchronize()
        timings[label] = time.perf_counter() - start
    assert torch.equal(outputs["tilegraph"], outputs["sdpa"])
    assert torch.equal(outputs["paged"], outputs["sdpa"])
    print({label: f"{seconds * 1e3:.1f} ms" for label, seconds in timings.items()})
    bf16 = model.to(torch.bfloat16)
    expected = logits(bf16, "sdpa", ids, mask)[real]
    assert (logits(bf16, NAME, ids, mask)[real] - expected).abs().max() <= 3e-2 * expected.abs().max()
