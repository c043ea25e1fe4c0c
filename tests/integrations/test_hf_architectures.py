"""Every decoder architecture the backend claims, with transformers' own model code on tiny random
weights: prefill logits of left- and right-padded batches equal eager attention's, and greedy
generate() gives eager's tokens with the dynamic cache, TilegraphCache and the static cache.
(The default tier runs one model per feature: test_hf_variants.py.)"""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_prefill_logits_match_eager(hf, arch):
    model = hf.tiny(arch)
    for rows in (hf.LEFT, hf.RIGHT):
        ids, mask = hf.batch(rows)
        hf.assert_logits_close(hf.logits(model, hf.NAME, ids, mask), hf.logits(model, "eager", ids, mask), mask)


@pytest.mark.slow
def test_greedy_tokens_match_eager_with_every_cache(hf, arch):
    model = hf.tiny(arch, seed=1)
    ids, mask = hf.batch(hf.LEFT)
    expected = hf.greedy(model, "eager", ids, mask, new=4)
    assert hf.greedy(model, hf.NAME, ids, mask, new=4).equal(expected)
    assert hf.greedy(model, hf.NAME, ids, mask, new=4, cache_implementation="static").equal(expected)
    assert hf.greedy(model, hf.NAME, ids, mask, new=4, cache=hf.paged_cache(model)).equal(expected)
