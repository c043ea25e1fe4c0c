"""Prompts through BatchPrefill: the chunked serving loop (ChunkedRunner) schedules prompt chunks next to
running decodes under a token budget, its graph loop equals its bit-exact eager twin, its greedy
tokens equal a dense float64 model's, a mixed step's attention matches float64, and the loop
reports time to first token and inter-token latency."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.errors import InputError
from tilegraph.page_pool import PagePool
from tilegraph.serving import ChunkedRunner, LoopResult, Request, default_token_buckets, serve
from tilegraph.serving.llama import LlamaConfig, LlamaDecoder
from tilegraph.serving.loop import _Running, _schedule
from tilegraph.serving.reference import attention_reference, dense_llama_logits, gather_kv, relative_error

DEVICE = torch.device("cpu" if tilegraph.SIMULATOR else "cuda")
BUDGET = 8  # token rows per step: the 12-token prompt needs two steps


def setup(dtype="float32"):
    config = LlamaConfig.tiny(dtype=dtype, seed=5)
    settings = config.attention_settings(page_size=4, max_batch_size=4, max_num_pages=16, num_ctas=4,
                                         max_num_tokens=BUDGET, graphs={"batch_sizes": [1, 2, 4]})  # fmt: skip
    return config, settings, LlamaDecoder(config, DEVICE)


def workload(vocab: int) -> list[Request]:
    rng = np.random.default_rng()
    shapes = [(12, 3, 0), (1, 3, 0), (5, 2, 1), (3, 3, 2)]
    return [Request(i, tuple(rng.integers(0, vocab, p).tolist()), n, a) for i, (p, n, a) in enumerate(shapes)]


def running(prompt_lens, fed):
    return [_Running(Request(i, (1,) * p, 2), num_fed=f, output=[7] if f >= p else []) for i, (p, f) in enumerate(zip(prompt_lens, fed))]


def test_schedule_feeds_decodes_first_then_prompt_chunks_within_the_budget():
    batch, counts = _schedule(running([12, 1, 5, 3], [0, 1, 0, 3]), 8)  # requests 1 and 3 are decoding
    assert [r.request.request_id for r in batch] == [0, 1, 3] and counts == [6, 1, 1]
    batch, counts = _schedule(running([12, 1, 5], [6, 0, 0]), 8)
    assert counts == [6, 1, 1]  # the rest of request 0's prompt, then the next prompts in order
    batch, counts = _schedule(running([4, 4], [0, 0]), None)  # no budget: one row each (DecodeRunner)
    assert counts == [1, 1]


def test_latencies_are_computed_from_the_step_times():
    result = LoopResult(tokens={0: [1, 2, 3]}, step_s=[0.5, 0.25, 0.125, 1.0], batch_sizes=[1] * 4,
                        joined_at={0: 1}, finished_at={0: 3}, token_steps={0: [1, 2, 3]})  # fmt: skip
    assert result.ttft_s(0) == pytest.approx(0.25)  # joined at step 1, first token at its end
    assert result.itl_s(0) == pytest.approx((0.125 + 1.0) / 2)
    assert LoopResult({0: [1]}, [0.5], [1], {0: 0}, {0: 0}, {0: [0]}).itl_s(0) is None


def test_runner_refuses_a_token_budget_outside_its_bounds():
    config, settings, model = setup()
    with pytest.raises(InputError, match="max_step_tokens=2 must lie in"):
        ChunkedRunner(model, settings, mode="eager", max_step_tokens=2)  # below max_batch_size
    with pytest.raises(InputError, match="max_step_tokens=9 must lie in"):
        ChunkedRunner(model, settings, mode="eager", max_step_tokens=9)
    assert default_token_buckets(8) == [1, 2, 4, 8] and default_token_buckets(6) == [1, 2, 4, 6]


@pytest.fixture(scope="module")
def loops():
    config, settings, model = setup()
    requests = workload(config.vocab_size)
    out = {}
    for mode in ("eager_padded", "graphs"):
        runner = ChunkedRunner(model, settings, mode=mode)
        pool = PagePool(settings)
        out[mode] = (runner, serve(runner, requests, pool))
        assert pool.num_free_pages == settings.max_num_pages, "pages leaked"
    return model, requests, out


def test_graph_loop_equals_its_eager_twin_and_prompts_go_in_chunks(loops):
    _, requests, out = loops
    runner, graphs = out["graphs"]
    assert graphs.tokens == out["eager_padded"][1].tokens
    assert all(len(graphs.tokens[r.request_id]) == r.max_new_tokens for r in requests)
    assert max(graphs.step_tokens) == BUDGET  # the long prompt filled a step
    assert any(t > b for t, b in zip(graphs.step_tokens, graphs.batch_sizes))  # steps carried prompt chunks
    # far fewer steps than one prompt token per step would take
    assert graphs.num_steps < sum(len(r.prompt) for r in requests)
    assert runner.graphs.stats.replays == graphs.num_steps and runner.graphs.stats.eager_steps == 0
    assert all(graphs.ttft_s(r.request_id) > 0 for r in requests)


def test_chunked_greedy_tokens_match_a_dense_float64_model(loops):
    """Teacher-forced on the loop's own tokens: each greedy token is the float64 model's argmax
    (near-ties within 1e-3 counted, and rare)."""
    model, requests, out = loops
    tokens = out["graphs"][1].tokens
    near_ties = 0
    for r in requests:
        generated = tokens[r.request_id]
        logits = dense_llama_logits(model, list(r.prompt) + generated[:-1])[len(r.prompt) - 1 :]
        top2 = logits.topk(2, dim=-1).values
        for step, token in enumerate(generated):
            if top2[step, 0] - top2[step, 1] < 1e-3:
                near_ties += 1
                continue
            assert token == int(logits[step].argmax()), (r.request_id, step)
    assert near_ties <= 1


def test_a_mixed_step_attention_matches_float64():
    """An eager step of a prompt chunk, a decode row and a new prompt: layer 0's BatchPrefill output
    vs the float64 reference with causal offsets over each request's gathered cache."""
    config, settings, model = setup("float16")
    runner = ChunkedRunner(model, settings, mode="eager")
    pool = PagePool(settings)
    rng = np.random.default_rng()

    def step(ids, counts):
        append = pool.allocate_step(ids, counts)
        table = pool.page_table(ids)
        tokens = rng.integers(0, config.vocab_size, sum(counts)).astype(np.int32)
        runner.buffers.load(tokens, append, table, (np.cumsum(counts) - 1).astype(np.int32))
        runner.plan(table, counts)
        q, out = model.first_layer_attention(runner.buffers.inputs(sum(counts)), runner.paged)  # appends layer 0's K/V
        return table, q, out

    step(["a", "b"], [4, 2])  # two prompts: their K/V reach layer 0's cache
    ids, counts = ["a", "b", "c"], [2, 1, 3]  # a's next chunk, b decoding, c's prompt
    table, q, out = step(ids, counts)
    cache, row = runner.paged.kv_cache[0], 0
    for r, n in enumerate(counts):
        pages = table.kv_indices[table.kv_indptr[r] : table.kv_indptr[r + 1]]
        kv_len = pool.kv_len(ids[r])
        k, v = gather_kv(cache, settings, torch.as_tensor(pages).long(), kv_len)
        assert (k.abs().sum(dim=(-1, -2)) > 0).all(), "every KV row must have been written (not the zero-filled cache)"
        ref, _ = attention_reference(q[row : row + n], k, v, settings.sm_scale, causal_offset=kv_len - n)
        assert relative_error(out[row : row + n], ref) < 5e-3, ids[r]
        row += n
