"""CascadeAttention under the graph discipline: one capture per row bucket (through GraphRunner:
SimulatedGraph on the simulator, a real CUDA graph on a GPU) replays steps with new suffix lengths,
other groups and multi-row requests, matches flat attention over the concatenated KV, and leaves
padded rows alone. Replays need a fresh plan of every level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.cascade import CascadeAttention, LevelTable
from tilegraph.graphs.standin import SimulatedGraph
from tilegraph.serving.reference import attention_reference, gather_kv, relative_error

SETTINGS = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=8, max_num_pages=96, max_num_tokens=32, num_ctas=2)  # fmt: skip
BUCKET = 8


def two_levels(requests, groups, rng):
    """requests [(qo_len, suffix_len)], groups [(consecutive requests, prefix_len)] -> (LevelTables,
    per request the (pages, kv_len) of its group and of its suffix)."""
    free = iter(rng.permutation(SETTINGS.max_num_pages).tolist())
    entries, start = [], 0
    for count, kv_len in groups:
        entries.append((range(start, start + count), kv_len))
        start += count
    tables, seen = [], [[] for _ in requests]
    for level in (entries, [(range(r, r + 1), kv) for r, (_, kv) in enumerate(requests)]):
        qo, indptr, indices, last = [0], [0], [], []
        for members, kv_len in level:
            pages = [next(free) for _ in range(-(-kv_len // 4))]
            qo.append(qo[-1] + sum(requests[m][0] for m in members))
            indices += pages
            indptr.append(len(indices))
            last.append((kv_len - 1) % 4 + 1 if kv_len else 1)
            for m in members:
                seen[m].append((pages, kv_len))
        tables.append(LevelTable(*(np.array(a, np.int32) for a in (qo, indptr, indices, last))))
    return tables, seen


def expected(q, cache, requests, seen):
    outs, start = [], 0
    for (qo_len, _), levels in zip(requests, seen):
        parts = [gather_kv(cache, SETTINGS, torch.as_tensor(p, dtype=torch.long), n) for p, n in levels]
        k, v = torch.cat([a[0] for a in parts]), torch.cat([a[1] for a in parts])
        outs.append(attention_reference(q[start : start + qo_len], k, v, SETTINGS.sm_scale)[0])
        start += qo_len
    return torch.cat(outs)


def test_cascade_replays_new_suffixes_and_groups(device):
    rng = np.random.default_rng()
    cascade = CascadeAttention(SETTINGS, num_levels=2, device=device)
    cache = torch.randn(96, 2, 4, 2, 16).half().to(device)
    static_out = torch.empty(BUCKET, 4, 16, dtype=torch.float16, device=device)

    def forward(inputs):
        static_out.fill_(7.0)  # aten ops around the attention replay too
        cascade.run(inputs["q"], cache, out=static_out[: inputs["q"].shape[0]])
        return static_out

    example = {"q": torch.zeros(BUCKET, 4, 16, dtype=torch.float16, device=device)}
    runner = tilegraph.GraphRunner(forward, example, attention=cascade, buckets=[BUCKET])
    runner.capture_all(show_progress=False)
    graph = runner._graphs[BUCKET].graph
    if isinstance(graph, SimulatedGraph):
        assert graph.num_kernel_launches == 5  # 2 levels x (attention + partial merge) + 1 state merge
    steps = [
        ([(1, 5), (1, 0), (1, 9), (1, 2)], [(4, 13)]),  # 4 decode rows under one prefix, one empty suffix
        ([(1, 1), (1, 7), (1, 3)], [(2, 6), (1, 0)]),  # new suffix lengths, a group of 1 with no prefix
        ([(3, 4), (2, 0), (1, 11)], [(1, 20), (2, 3)]),  # multi-row requests
    ]
    for requests, groups in steps:
        tables, seen = two_levels(requests, groups, rng)
        rows = int(tables[-1].qo_indptr[-1])
        q = torch.randn(rows, 4, 16).half().to(device)
        got = runner.step({"q": q}, lambda n: cascade.plan(tables, padded_num_tokens=n))
        assert cascade.graph_plan_state().padded_batch_size == BUCKET
        assert relative_error(got[:rows], expected(q, cache, requests, seen)) < 4e-3, (requests, groups)
        assert (static_out[rows:].cpu() == 7).all(), "a padded row was written"
    assert runner.stats.replays == len(steps) and runner.stats.eager_steps == 0
    with pytest.raises(tilegraph.StateError, match="without a new plan"):
        runner.replay(BUCKET)
    cascade.levels[0].plan(*vars(tables[0]).values(), padded_num_tokens=BUCKET)
    with pytest.raises(tilegraph.StateError, match="without a new plan"):
        runner.replay(BUCKET)  # one level replanned is not enough: every level needs a fresh plan


def test_graph_state_and_buffers_cover_every_level(device):
    cascade = CascadeAttention(SETTINGS, num_levels=3, causal=True, device=device)
    assert cascade.graph_plan_state().serial == 0
    cascade.graph_prepare_capture(BUCKET)
    state = cascade.graph_plan_state()
    assert state.serial > 0 and state.padded_batch_size == BUCKET and state.key.startswith("cascade:3:causal|")
    buffers = cascade.graph_buffers()
    assert {name.split(":")[0] for name in buffers} == {"level0", "level1", "level2"}
    assert isinstance(cascade, tilegraph.GraphAware)
