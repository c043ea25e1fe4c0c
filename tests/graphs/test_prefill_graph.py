"""Prefill under the graph discipline: a step captured once per token bucket (SimulatedGraph on the
simulator, a real CUDA graph on a GPU) replays with any batch whose tokens fit the bucket --
other lengths, mixed decode + prefill, split plans -- and matches the reference. Also: run() is a
custom op that torch.compile traces without graph breaks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.graphs.standin import SimulatedGraph
from tilegraph.serving.reference import attention_reference, gather_kv, relative_error

SETTINGS = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=4, max_num_pages=64, max_num_tokens=32, num_ctas=4)  # fmt: skip
BUCKET = 16


def new_graph(device):
    return SimulatedGraph() if device.type != "cuda" else torch.cuda.CUDAGraph()


def capture(att, forward, device):
    """The GraphRunner's phases for one bucket: stand-in plan, warm-up, stand-in plan + upload, capture."""
    att.graph_prepare_capture(BUCKET)
    forward()
    att.graph_prepare_capture(BUCKET)
    att.graph_before_replay()
    graph = new_graph(device)
    att.graph_set_capturing(True)
    try:
        if device.type == "cuda":
            with torch.cuda.graph(graph):
                forward()
        else:
            with graph.capture():
                forward()
    finally:
        att.graph_set_capturing(False)
    return graph


def page_table(requests, rng):
    counts = [-(-kv // 4) for _, kv in requests]
    pages = rng.permutation(SETTINGS.max_num_pages)[: sum(counts)].astype(np.int32)
    qo = np.concatenate([[0], np.cumsum([q for q, _ in requests])]).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(kv - 1) % 4 + 1 if kv else 1 for _, kv in requests], np.int32)
    return qo, indptr, pages, last


def expected(q, requests, kv_of):
    outs, start = [], 0
    for r, (qo_len, kv_len) in enumerate(requests):
        k, v = kv_of(r)
        outs.append(attention_reference(q[start : start + qo_len].double() * 2, k, v, SETTINGS.sm_scale, kv_len - qo_len)[0])
        start += qo_len
    return torch.cat(outs) + 1


@pytest.fixture
def device():
    return torch.device("cpu" if tilegraph.SIMULATOR else "cuda")


def test_paged_prefill_replays_any_batch_in_its_token_bucket(device):
    rng = np.random.default_rng()
    pre = tilegraph.BatchPrefill(SETTINGS, causal=True, device=device)
    cache = torch.randn(64, 2, 4, 2, 16).half().to(device)
    static_q = torch.zeros(BUCKET, 4, 16, dtype=torch.float16, device=device)
    static_out = torch.empty(BUCKET, 4, 16, dtype=torch.float16, device=device)

    def forward():
        # aten ops around the attention call replay too
        static_out.fill_(7.0)
        pre.run(static_q * 2, cache, out=static_out)
        static_out.add_(1)

    graph = capture(pre, forward, device)
    if isinstance(graph, SimulatedGraph):
        assert graph.num_kernel_launches == 2  # the attention launch + the partial merge
    batches = [
        [(5, 5), (1, 30), (9, 20)],  # mixed prefill (with and without prefix) + decode
        [(1, 150), (2, 41)],  # few queries, long KV: split
        [(16, 16)],  # the full bucket
        [(3, 3)],
    ]
    for requests in batches:
        qo, indptr, pages, last = page_table(requests, rng)
        plan = pre.plan(qo, indptr, pages, last, padded_num_tokens=BUCKET)
        assert pre.graph_plan_state().padded_batch_size == BUCKET
        n = int(qo[-1])
        q = torch.randn(n, 4, 16).half().to(device)
        static_q[:n] = q
        pre.graph_before_replay()
        graph.replay()

        def kv_of(r):
            return gather_kv(cache, SETTINGS, torch.as_tensor(pages[indptr[r] : indptr[r + 1]], dtype=torch.long), requests[r][1])

        assert relative_error(static_out[:n], expected(q, requests, kv_of)) < 4e-3, plan
        assert (static_out[n:].cpu() == 8).all(), "a padded row was written"
        if requests[0] == (1, 150):
            assert plan.num_merges > 0, "expected a split plan"


def test_ragged_prefill_replays_any_batch_in_its_token_bucket(device):
    pre = tilegraph.BatchPrefillRagged(SETTINGS, causal=True, device=device)
    static_k = torch.zeros(200, 2, 16, dtype=torch.float16, device=device)
    static_v = torch.zeros(200, 2, 16, dtype=torch.float16, device=device)
    static_q = torch.zeros(BUCKET, 4, 16, dtype=torch.float16, device=device)
    static_out = torch.empty(BUCKET, 4, 16, dtype=torch.float16, device=device)

    def forward():
        static_out.fill_(7.0)
        pre.run(static_q * 2, static_k, static_v, out=static_out)
        static_out.add_(1)

    graph = capture(pre, forward, device)
    for requests in ([(4, 10), (1, 120), (7, 7)], [(2, 60)]):
        qo = torch.tensor(np.concatenate([[0], np.cumsum([q for q, _ in requests])]), dtype=torch.int32)
        kv = torch.tensor(np.concatenate([[0], np.cumsum([k for _, k in requests])]), dtype=torch.int32)
        pre.plan(qo, kv, padded_num_tokens=BUCKET)
        n, nkv = int(qo[-1]), int(kv[-1])
        q = torch.randn(n, 4, 16).half().to(device)
        static_q[:n] = q
        static_k[:nkv] = torch.randn(nkv, 2, 16).half()
        static_v[:nkv] = torch.randn(nkv, 2, 16).half()
        pre.graph_before_replay()
        graph.replay()

        def kv_of(r):
            return static_k[kv[r] : kv[r + 1]].double().cpu(), static_v[kv[r] : kv[r + 1]].double().cpu()

        assert relative_error(static_out[:n], expected(q, requests, kv_of)) < 4e-3


def test_plan_during_capture_is_refused(device):
    pre = tilegraph.BatchPrefill(SETTINGS, causal=True, device=device)
    pre.graph_set_capturing(True)
    with pytest.raises(tilegraph.StateError, match="capture"):
        pre.plan(*page_table([(2, 3)], np.random.default_rng()))
    pre.graph_set_capturing(False)
    pre.plan(*page_table([(2, 3)], np.random.default_rng()))


def test_compiled_forward_has_no_graph_breaks_and_matches_eager(device):
    pre = tilegraph.BatchPrefill(SETTINGS, causal=True, device=device)
    cache = torch.randn(64, 2, 4, 2, 16).half().to(device)
    pre.plan(*page_table([(3, 9), (1, 4)], np.random.default_rng()))

    def forward(q):
        return pre.run(q * 2, cache) + 1

    q = torch.randn(4, 4, 16).half().to(device)
    explanation = torch._dynamo.explain(forward)(q)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q), forward(q))


def test_fake_implementations_run_on_meta_tensors():
    device = "cpu" if tilegraph.SIMULATOR else "cuda"
    q = torch.empty(4, 4, 16, dtype=torch.float16, device="meta")
    out, lse = torch.empty_like(q), torch.empty(0, 4, device="meta")
    cache = torch.empty(64, 2, 4, 2, 16, dtype=torch.float16, device="meta")
    kv = torch.empty(9, 2, 16, dtype=torch.float16, device="meta")
    torch.ops.tilegraph.batch_prefill(tilegraph.BatchPrefill(SETTINGS, device=device)._handle, q, cache, cache, False, out, lse, False)
    torch.ops.tilegraph.batch_prefill_ragged(tilegraph.BatchPrefillRagged(SETTINGS, device=device)._handle, q, kv, kv, out, lse, False)
    assert out.device.type == "meta"
