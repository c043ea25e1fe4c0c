"""torch.compile over the transformers backend: each layer's attention is one custom op, so the
layout, the plan and the page bookkeeping run eagerly inside it on every call. A compiled model
follows each batch's padding (backend "aot_eager", cold: no eager call first), and a decode loop
with the static cache or TilegraphCache compiles with ``fullgraph=True`` (any graph break fails)."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache


@pytest.fixture(autouse=True)
def fresh_dynamo(hf):
    torch._dynamo.reset()
    hf.backend.clear_attention_objects()  # cold: no attention object or plan exists before compiling
    yield
    torch._dynamo.reset()


def test_compiled_logits_follow_each_batch_padding(hf):
    """Two batches of one shape, padded differently: the compiled model (aot_eager) matches sdpa on both."""
    model = hf.tiny("llama")
    first = hf.batch(hf.LEFT)
    second = hf.batch(([row[::-1] for row in hf.LEFT[0]], [row[::-1] for row in hf.LEFT[1]]))  # right-padded
    expected = [hf.logits(model, "sdpa", ids, mask) for ids, mask in (first, second)]
    assert hf.differs(expected[0], expected[1], first[1] & second[1])  # the two batches are not the same problem
    model.set_attn_implementation(hf.NAME)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        actual = [compiled(input_ids=ids, attention_mask=mask).logits.float() for ids, mask in (first, second)]
    for got, want, (_, mask) in zip(actual, expected, (first, second)):
        hf.assert_logits_close(got, want, mask)


def decode_loop(model, step, ids, mask, cache, new: int) -> torch.Tensor:
    """Prefill then ``new`` - 1 greedy decode steps through ``step`` (a model or its compiled self)."""
    tokens = []
    with torch.no_grad():
        logits = step(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
        for _ in range(new):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits = step(input_ids=token, attention_mask=mask, cache=cache, use_cache=True).logits
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("cache_kind", ["static", "paged"])
def test_fullgraph_decode_loop_matches_eager_generate(hf, cache_kind):
    model = hf.tiny("llama", seed=1)
    ids, mask = hf.batch(hf.LEFT)
    expected = hf.greedy(model, "sdpa", ids, mask, new=3)[:, ids.shape[1] :]
    model.set_attn_implementation(hf.NAME)
    max_len = ids.shape[1] + 4
    if cache_kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=max_len)
    else:
        cache = hf.paged_cache(model, max_cache_len=max_len, dtype=torch.float32, device=hf.DEVICE)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # a graph break raises
    assert decode_loop(model, compiled, ids, mask, cache, new=3).equal(expected)


def test_paged_cache_compiles_only_with_preallocated_pages(hf):
    model = hf.tiny("llama")
    ids, mask = hf.batch(hf.LEFT)
    cache = hf.paged_cache(model, max_cache_len=12)  # no dtype/device: pages would be made inside the graph
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad(), pytest.raises(Exception, match="pass dtype= and device="):
        compiled(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2-cap50", "gpt-oss", "mistral-window"])
def test_fullgraph_decode_loop_with_variants(hf, name):
    model = hf.tiny(name, seed=3)
    ids, mask = hf.batch(hf.LEFT)
    expected = hf.greedy(model, "eager", ids, mask, new=3)[:, ids.shape[1] :]
    model.set_attn_implementation(hf.NAME)
    for cache in (StaticCache(config=model.config, max_cache_len=12),
                  hf.paged_cache(model, max_cache_len=12, dtype=torch.float32, device=hf.DEVICE)):  # fmt: skip
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert decode_loop(model, compiled, ids, mask, cache, new=3).equal(expected)


@pytest.mark.slow
def test_aot_eager_generate_with_static_cache(hf):
    model = hf.tiny("gemma2-cap0.02", seed=4)
    ids, mask = hf.batch(hf.LEFT)
    expected = hf.greedy(model, "eager", ids, mask, new=3)[:, ids.shape[1] :]
    model.set_attn_implementation(hf.NAME)
    compiled = torch.compile(model, backend="aot_eager")
    assert decode_loop(model, compiled, ids, mask, StaticCache(config=model.config, max_cache_len=12), new=3).equal(expected)


def test_paged_cache_refuses_to_compile_a_model_that_hides_its_kwargs(hf):
    """GPT-NeoX calls cache.update() without the attention kwargs (eagerly the key tensor carries the
    link instead); compiled, that cannot work, and it says so."""
    model = hf.tiny("gpt-neox")
    ids, mask = hf.batch(hf.LEFT)
    cache = hf.paged_cache(model, max_cache_len=12, dtype=torch.float32, device=hf.DEVICE)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad(), pytest.raises(Exception, match="without its attention kwargs"):
        compiled(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
