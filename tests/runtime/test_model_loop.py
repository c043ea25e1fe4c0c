"""The Llama-style decoder under continuous batching: eager and graph-replayed loops agree token for
token, the paged attention inside the model matches float64, the whole model matches a dense float64
model, and the page pool ends empty. On the simulator the graphs are the stand-in (SimulatedGraph)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.errors import InputError
from tilegraph.serving.llama import LlamaConfig, LlamaDecoder, allocate_kv_cache, rms_norm
from tilegraph.page_pool import PagePool
from tilegraph.serving.reference import dense_llama_logits as dense_logits
from tilegraph.serving.reference import decode_reference, relative_error
from tilegraph.serving import DecodeRunner, Request, attention_error, serve

DEVICE = torch.device("cpu" if tilegraph.SIMULATOR else "cuda")
BUCKETS = [1, 2, 4]  # max_batch_size 6: batches of 5 and 6 run eagerly inside the graph runner


def setup(dtype="float32", kv_layout="NHD", max_num_pages=10):
    config = LlamaConfig.tiny(dtype=dtype, seed=3)
    settings = config.attention_settings(page_size=4, max_batch_size=6, max_num_pages=max_num_pages, num_ctas=4,
                                         kv_layout=kv_layout, graphs={"batch_sizes": BUCKETS})  # fmt: skip
    return config, settings, LlamaDecoder(config, DEVICE)


def workload(vocab: int) -> list[Request]:
    """Tiny to long (15 tokens = 4 pages), joining at steps 0-3; 13 pages at their final lengths
    against a pool of 10, so one request waits for pages."""
    rng = np.random.default_rng(7)
    shapes = [(12, 4, 0), (1, 3, 0), (5, 2, 1), (2, 4, 2), (1, 2, 2), (2, 1, 3), (3, 3, 3)]
    return [Request(i, tuple(rng.integers(0, vocab, p).tolist()), n, a) for i, (p, n, a) in enumerate(shapes)]


def run(model, settings, requests, mode):
    runner = DecodeRunner(model, settings, mode=mode)
    pool = PagePool(settings)
    result = serve(runner, requests, pool)
    assert pool.request_ids == [] and pool.num_free_pages == settings.max_num_pages, "pages leaked"
    return runner, result


@pytest.fixture(scope="module")
def fp32_loops():
    config, settings, model = setup("float32")
    requests = workload(config.vocab_size)
    return model, settings, requests, {mode: run(model, settings, requests, mode) for mode in ("eager", "eager_padded", "graphs")}


def test_graph_loop_matches_eager_loops(fp32_loops):
    model, settings, requests, loops = fp32_loops
    graph_runner, graphs = loops["graphs"]
    _, padded = loops["eager_padded"]
    _, eager = loops["eager"]
    assert graphs.tokens == padded.tokens, "a replay must compute exactly what eager does on the same rows"
    assert graphs.tokens == eager.tokens
    assert all(len(graphs.tokens[r.request_id]) == r.max_new_tokens for r in requests)
    # requests joined and finished at different steps; one waited for pages past its arrival
    assert len(set(graphs.joined_at.values())) > 2 and len(set(graphs.finished_at.values())) > 2
    assert any(graphs.joined_at[r.request_id] > r.arrival_step for r in requests)
    # the batch crossed buckets, and steps above the largest ran eagerly inside the graph runner
    buckets_used = {graph_runner.bucket_for(b) for b in graphs.batch_sizes}
    assert {1, 2, 4} <= buckets_used and None in buckets_used
    stats = graph_runner.graphs.stats
    assert stats.eager_steps == sum(b > BUCKETS[-1] for b in graphs.batch_sizes) > 0
    assert stats.replays == sum(b <= BUCKETS[-1] for b in graphs.batch_sizes) > 0
    assert set(stats.capture_s) == set(BUCKETS)


def test_greedy_tokens_match_a_dense_float64_model(fp32_loops):
    """Teacher-forced on the loop's own tokens: every greedy token is the float64 model's argmax
    (positions whose top two logits are within 1e-3 would be ties at float32; none are skipped
    silently -- they are counted and must be rare)."""
    model, _, requests, loops = fp32_loops
    tokens = loops["graphs"][1].tokens
    near_ties = 0
    for r in requests:
        generated = tokens[r.request_id]
        fed = list(r.prompt) + generated[:-1]
        logits = dense_logits(model, fed)[len(r.prompt) - 1 :]
        top2 = logits.topk(2, dim=-1).values
        for step, token in enumerate(generated):
            if top2[step, 0] - top2[step, 1] < 1e-3:
                near_ties += 1
                continue
            assert token == int(logits[step].argmax()), f"request {r.request_id}, generated token {step}"
    assert near_ties <= 1


@pytest.mark.parametrize("dtype,kv_layout", [("float16", "HND"), pytest.param("bfloat16", "NHD", marks=pytest.mark.slow)])
def test_half_precision_graph_loop_matches_eager_padded(dtype, kv_layout):
    config, settings, model = setup(dtype, kv_layout)
    requests = workload(config.vocab_size)[:5]
    _, graphs = run(model, settings, requests, "graphs")
    _, padded = run(model, settings, requests, "eager_padded")
    assert graphs.tokens == padded.tokens


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_attention_inside_the_model_matches_float64(dtype):
    """Serve a few steps, then one more whose layer-0 attention (BatchDecode over the paged cache the
    loop filled, q a strided view of the fused QKV output) is checked against float64 on the
    gathered cache; the new k/v rows must be in the cache at their positions."""
    config, settings, model = setup(dtype, max_num_pages=24)
    runner = DecodeRunner(model, settings, mode="eager")
    pool = PagePool(settings)
    serve(runner, workload(config.vocab_size), pool, max_steps=5)
    ids = pool.request_ids
    assert len(ids) >= 3 and len({pool.kv_len(i) for i in ids}) >= 3
    err = attention_error(runner, pool, [5] * len(ids))
    assert err < (2e-2 if dtype == "bfloat16" else 5e-3)

    # the step's appended K sits at each request's last position (layer 0), equal to rope(k)
    table = pool.page_table(ids)
    inputs = runner.buffers.inputs(len(ids))
    q, _ = model.first_layer_attention(inputs, runner.paged)  # same step again: same slots, same values
    assert q.stride(0) == config.qkv_size and q.stride(2) == 1, "q should be a strided view of the QKV output"
    layer = model.weights.layers[0]
    x = rms_norm(torch.nn.functional.embedding(inputs["token_ids"], model.weights.embed), layer.attn_norm, config.rms_norm_eps)
    _, k, _ = model._qkv(layer, x, *model._rope(inputs["positions"]))
    cache = runner.paged.kv_cache[0]
    for row, rid in enumerate(ids):
        pos = pool.kv_len(rid) - 1
        page = pool.pages(rid)[pos // settings.page_size]
        cached = cache[page, 0, pos % settings.page_size]  # NHD: [2, page_size, heads, dim]
        assert torch.equal(cached, k[row])
    expected, _ = decode_reference(q, cache, settings, *table)
    assert relative_error(runner.decode.run(q, cache), expected) == pytest.approx(err, rel=1e-6, abs=1e-9)


def test_step_buffers_pad_rows_and_page_table():
    config, settings, model = setup("float32")
    runner = DecodeRunner(model, settings, mode="eager")
    pool = PagePool(settings)
    append = pool.allocate_step(["a", "b"], [5, 1])  # positions 0-4 and 0 (any growth works here)
    append = pool.allocate_step(["a", "b"])
    table = pool.page_table(["a", "b"])
    runner.buffers.load(np.array([3, 4], np.int32), append, table)
    views = {name: t.cpu().numpy() for name, t in runner.buffers.views.items()}
    assert views["token_ids"][:3].tolist() == [3, 4, 0]
    assert views["positions"][:3].tolist() == [5, 1, 0]
    assert views["batch_indices"].tolist() == [0, 1, -1, -1, -1, -1]
    assert views["kv_indptr"].tolist() == [0, 2, 3, 3, 3, 3, 3]
    assert views["kv_indices"][:3].tolist() == table.kv_indices.tolist()


def test_bad_requests_are_refused_before_any_step():
    config, settings, model = setup("float32")
    runner = DecodeRunner(model, settings, mode="eager")
    with pytest.raises(InputError, match="max_position"):
        serve(runner, [Request(0, (1,) * 200, config.max_position)])
    with pytest.raises(InputError, match="vocab_size"):
        serve(runner, [Request(0, (config.vocab_size,), 1)])
    with pytest.raises(InputError, match="twice"):
        serve(runner, [Request(0, (1,), 1), Request(0, (2,), 1)])
    with pytest.raises(InputError, match="do not match"):
        allocate_kv_cache(config, settings.model_copy(update={"head_dim": 32}), DEVICE)


@pytest.mark.slow
def test_demo_passes():
    from tilegraph.serving.demo import main

    assert main([]) == 0


@pytest.mark.slow
def test_bench_graphs_smoke(tmp_path):
    from tilegraph.tools.bench.graphs import main

    rows = main(["--smoke", "--out", str(tmp_path)])
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert all(r["logits_max_diff"] == 0 and 0 < r["attention_share"] for r in rows)
    assert (tmp_path / "graphs.json").exists()


@pytest.mark.gpu
def test_gpu_graph_loop_matches_eager_padded():
    config = LlamaConfig.tiny(dtype="bfloat16", hidden_size=256, num_layers=4, num_qo_heads=8, num_kv_heads=2, head_dim=64)
    settings = config.attention_settings(page_size=16, max_batch_size=24, max_num_pages=256, graphs={"batch_sizes": [1, 4, 8]})
    model = LlamaDecoder(config, DEVICE)
    rng = np.random.default_rng(0)
    requests = [Request(i, tuple(rng.integers(0, config.vocab_size, int(p)).tolist()), int(n), int(a))
                for i, (p, n, a) in enumerate(zip(rng.integers(1, 120, 20), rng.integers(4, 40, 20), rng.integers(0, 30, 20)))]  # fmt: skip
    runner, graphs = run(model, settings, requests, "graphs")
    assert isinstance(runner.graphs._graphs[8].graph, torch.cuda.CUDAGraph)
    _, padded = run(model, settings, requests, "eager_padded")
    assert graphs.tokens == padded.tokens
    assert runner.graphs.stats.eager_steps > 0 and runner.graphs.stats.replays > 0
