"""Prefill planner properties: every (request, query token, qo head, allowed KV token) is covered by
exactly one tile; split tiles get distinct slots that exactly one merge entry combines, in KV order;
buffer sizes depend only on Settings; counts stay within the layout capacities; LPT balance holds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tilegraph
from tilegraph import InputError, PlanError
from tilegraph.planner.plan import TILE_OVERHEAD_TOKENS
from tilegraph.planner.prefill import plan_prefill, plan_prefill_ragged
from tilegraph.planner.prefill_layout import PrefillLayout


def settings_for(group: int, num_kv_heads: int, deterministic: bool = False, **extra) -> tilegraph.Settings:
    base = dict(num_qo_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, head_dim=16, page_size=4,
                max_batch_size=8, max_num_pages=512, max_num_tokens=96, deterministic=deterministic)  # fmt: skip
    return tilegraph.Settings(**{**base, **extra})


def ragged_plan(layout, requests, causal):
    qo = np.concatenate([[0], np.cumsum([q for q, _ in requests])]).astype(np.int32)
    kv = np.concatenate([[0], np.cumsum([k for _, k in requests])]).astype(np.int32)
    return plan_prefill_ragged(layout, qo, kv, causal=causal, serial=7)


def check_plan(plan, layout, requests, causal):
    tiles = plan.tiles()
    n = plan.num_tiles
    assert n <= layout.tile_capacity and plan.num_merges <= layout.merge_capacity
    assert plan.num_slots <= layout.slot_capacity
    assert plan.buffer.shape == (layout.plan_words,)
    # CTA grouping: cta_tile_indptr partitions the tiles, tile_cta agrees
    indptr = plan.section("cta_tile_indptr")[: layout.num_ctas + 1].astype(np.int64)
    assert indptr[0] == 0 and indptr[-1] == n and (np.diff(indptr) >= 0).all()
    assert (tiles["cta"] == np.repeat(np.arange(layout.num_ctas), np.diff(indptr))).all()
    # coverage: count, per (request, token, kv_head, kv position), the tiles covering it
    qo_begin = np.concatenate([[0], np.cumsum([q for q, _ in requests])])
    cover = {r: np.zeros((q, layout.num_kv_heads, max(k, 1)), np.int64) for r, (q, k) in enumerate(requests)}
    slot_owner = {}
    for t in range(n):
        r, q0, q1, h = tiles["request"][t], tiles["q_start"][t], tiles["q_end"][t], tiles["kv_head"][t]
        k0, k1 = tiles["kv_start"][t], tiles["kv_end"][t]
        qo_len, kv_len = requests[r]
        assert 0 <= q0 < q1 <= qo_len and q1 - q0 <= layout.q_tile
        assert 0 <= k0 <= k1 <= kv_len
        cover[r][q0:q1, h, k0:k1] += 1
        if tiles["slot"][t] >= 0:
            for i in range(q1 - q0):
                slot = tiles["slot"][t] + i * tiles["slot_stride"][t]
                assert slot not in slot_owner, "two tiles write one slot"
                slot_owner[slot] = (qo_begin[r] + q0 + i, h, k0)
    for r, (qo_len, kv_len) in enumerate(requests):
        for i in range(qo_len):
            allowed = max(0, kv_len - qo_len + i + 1) if causal else kv_len
            counts = cover[r][i, :, :allowed]
            assert (counts == 1).all(), f"request {r} token {i}: KV coverage {counts}"
            if kv_len == 0 and qo_len:  # an empty request still gets its (empty) tiles
                assert any(tiles["request"][t] == r for t in range(n))
    # merges: each split (token, head) once; its slots are exactly the ones written for it, in KV order
    slot_indptr, merge_token, merge_head = plan.merges()
    assert slot_indptr[0] == 0 and (np.diff(slot_indptr) >= 2).all()
    assert slot_indptr[-1] == plan.num_slots == len(slot_owner)
    seen = set()
    for m in range(plan.num_merges):
        key = (int(merge_token[m]), int(merge_head[m]))
        assert key not in seen
        seen.add(key)
        owners = [slot_owner[s] for s in range(slot_indptr[m], slot_indptr[m + 1])]
        assert all(o[:2] == key for o in owners)
        assert [o[2] for o in owners] == sorted(o[2] for o in owners)
    # LPT: makespan within the even spread plus the largest tile
    cost = tiles["kv_end"] - tiles["kv_start"] + TILE_OVERHEAD_TOKENS
    if n:
        assert plan.makespan == plan.cta_loads().max()
        assert plan.makespan <= cost.sum() / layout.num_ctas + cost.max()


requests_strategy = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 300)), min_size=1, max_size=8)


@given(
    requests=requests_strategy,
    group=st.sampled_from([1, 2, 3, 4, 16, 20]),
    num_kv_heads=st.sampled_from([1, 2, 3]),
    num_ctas=st.sampled_from([1, 2, 5, 16, 132]),
    causal=st.booleans(),
    deterministic=st.booleans(),
    tile_rows=st.sampled_from([16, 64, 128]),
)
def test_ragged_plan_properties(requests, group, num_kv_heads, num_ctas, causal, deterministic, tile_rows):
    if causal:
        requests = [(min(q, k), k) for q, k in requests]
    total = sum(q for q, _ in requests)
    if total > 96:
        requests = [(q * 96 // total, k) for q, k in requests]
    settings = settings_for(group, num_kv_heads, deterministic, num_ctas=num_ctas)
    layout = PrefillLayout.from_settings(settings, num_ctas, paged=False, tile_rows=tile_rows)
    assert layout.q_tile == max(1, tile_rows // group)
    plan = ragged_plan(layout, requests, causal)
    check_plan(plan, layout, requests, causal)
    if deterministic:
        assert plan.num_merges == 0


@given(requests=requests_strategy, page_size=st.sampled_from([1, 4, 16]), causal=st.booleans())
def test_paged_plan_properties(requests, page_size, causal):
    if causal:
        requests = [(min(q, k), k) for q, k in requests]
    requests = [(min(q, 12), k) for q, k in requests]
    settings = settings_for(2, 2, page_size=page_size, max_num_pages=4096, num_ctas=6)
    layout = PrefillLayout.from_settings(settings, 6)
    counts = [-(-k // page_size) for _, k in requests]
    rng = np.random.default_rng()
    qo = np.concatenate([[0], np.cumsum([q for q, _ in requests])]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    pages = rng.integers(0, 4096, sum(counts)).astype(np.int32)
    last = np.array([(k - 1) % page_size + 1 if k else 0 for _, k in requests], np.int32)
    plan = plan_prefill(layout, qo, kv_indptr, pages, last, num_pages=4096, causal=causal)
    check_plan(plan, layout, requests, causal)
    assert plan.max_page_index == (pages.max() if len(pages) else -1)
    assert (plan.section("kv_len")[: len(requests)] == [k for _, k in requests]).all()


def test_few_queries_long_kv_split_about_num_ctas_ways():
    settings = settings_for(1, 1, num_ctas=8)
    layout = PrefillLayout.from_settings(settings, 8, paged=False)
    plan = ragged_plan(layout, [(1, 4000)], causal=True)
    assert plan.num_tiles == 8 and plan.num_merges == 1 and plan.num_slots == 8
    assert plan.balance > 0.9  # each piece pays TILE_OVERHEAD_TOKENS


def test_many_queries_are_not_split():
    settings = settings_for(1, 2, num_ctas=4)
    layout = PrefillLayout.from_settings(settings, 4, paged=False)
    plan = ragged_plan(layout, [(16, 16)] * 6, causal=True)
    assert plan.num_merges == 0 and plan.num_tiles == 12


def test_capacities_hold_at_the_worst_case_bounds():
    """Fill max_num_tokens with the shortest query tiles and max_batch_size requests, and split hard."""
    settings = settings_for(4, 2, num_ctas=16, max_num_tokens=64, max_batch_size=8)
    layout = PrefillLayout.from_settings(settings, 16, paged=False)
    for requests in ([(1, 5000)] * 8, [(57, 5000)] + [(1, 1)] * 7, [(5, 7000), (59, 7000)], [(8, 8)] * 8):
        check_plan(ragged_plan(layout, requests, causal=True), layout, requests, causal=True)


@pytest.mark.parametrize("tile_rows", [64, 128])
def test_capacities_are_attained_with_gpu_tiles(tile_rows):
    """The tuning table's tile rows (64 / 128 on a GPU): the tile bound covers max_batch_size - 1
    requests of one token plus one long request filling max_num_tokens (the most tiles a batch can
    have; the bound counts one partial tile more), and the split bounds hold under hard splitting."""
    group, kv_heads, num_ctas = 2, 2, 4
    settings = settings_for(group, kv_heads, num_ctas=num_ctas, max_num_tokens=96, max_batch_size=8)
    layout = PrefillLayout.from_settings(settings, num_ctas, paged=False, tile_rows=tile_rows)
    q_tile = tile_rows // group
    assert layout.query_tile_capacity == kv_heads * (96 // q_tile + 8)
    requests = [(1, 3)] * 7 + [(96 - 7, 5)]
    plan = plan_prefill_ragged(layout, *[np.concatenate([[0], np.cumsum(x)]).astype(np.int32) for x in zip(*requests)],
                               causal=False, allow_split=False)  # fmt: skip
    tiles_needed = kv_heads * (7 + -(-(96 - 7) // q_tile))
    assert plan.num_tiles == tiles_needed <= layout.query_tile_capacity <= tiles_needed + kv_heads
    for requests in ([(1, 5000)] * 8, [(89, 5000)] + [(1, 1)] * 7, [(40, 7000), (56, 7000)]):
        check_plan(ragged_plan(layout, requests, causal=True), layout, requests, causal=True)


def test_tile_rows_must_be_a_multiple_of_16():
    with pytest.raises(InputError, match="tile_rows"):
        PrefillLayout.from_settings(settings_for(1, 1, num_ctas=2), 2, paged=False, tile_rows=40)


def test_workspace_is_query_rows_times_heads():
    """partial_out holds slot_capacity x group rows of head_dim fp32: slots count query tokens per
    kv_head (x chunks), so the group factor enters exactly once."""
    settings = settings_for(8, 2, num_ctas=132, max_num_tokens=8192)
    layout = PrefillLayout.from_settings(settings, 132)
    assert layout.partial_out_shape() == (layout.slot_capacity, 8, 16)
    assert layout.slot_capacity == 2 * 132 * layout.q_tile  # q_tile = 16 // 8 = 2 tokens per tile
    small = PrefillLayout.from_settings(settings_for(8, 2, num_ctas=132, max_num_tokens=1), 132)
    assert small.slot_capacity == 132 * 2 * 1  # bounded by num_ctas x kv_heads x max_num_tokens


def test_plan_size_depends_only_on_settings():
    settings = settings_for(2, 2, num_ctas=4)
    layout = PrefillLayout.from_settings(settings, 4, paged=False)
    sizes = {ragged_plan(layout, reqs, False).buffer.shape for reqs in ([(1, 1)], [(40, 90), (3, 0), (50, 7)])}
    assert sizes == {(layout.plan_words,)}


@pytest.mark.parametrize(
    "qo, kv, error, match",
    [
        ([1, 2], [0, 2], InputError, "qo_indptr\\[0\\]"),
        ([0, 3, 2], [0, 2, 4], InputError, "qo_indptr must be non-decreasing"),
        ([0, 2], [1, 3], InputError, "kv_indptr\\[0\\]"),
        ([0, 1, 2], [0, 3, 2], InputError, "kv_indptr must be non-decreasing"),
        ([0, 1], [0, 1, 2], InputError, "kv_indptr must have"),
        ([0, 97], [0, 100], PlanError, "max_num_tokens"),
        ([0] * 10, [0] * 10, PlanError, "max_batch_size"),
        ([], [], InputError, "qo_indptr"),
    ],
    ids=["qo-start", "qo-decreasing", "kv-start", "kv-decreasing", "kv-length", "tokens", "batch", "empty"],
)
def test_ragged_plan_errors(qo, kv, error, match):
    layout = PrefillLayout.from_settings(settings_for(1, 1, num_ctas=2), 2, paged=False)
    with pytest.raises(error, match=match):
        plan_prefill_ragged(layout, np.array(qo, np.int32), np.array(kv, np.int32), causal=True)


@pytest.mark.parametrize("group", [1, 16])
@pytest.mark.parametrize("num_ctas", [1, 4])
def test_causal_queries_beyond_the_kv_are_planned(group, num_ctas):
    """Causal qo_len > kv_len (FlashInfer's semantics; this used to be an InputError): the first
    qo_len - kv_len rows see no key -- their tiles hold no KV for them, an all-blind query tile an
    empty range -- and every query row is still in exactly one tile per kv_head (it is written)."""
    layout = PrefillLayout.from_settings(settings_for(group, 2, num_ctas=num_ctas), num_ctas, paged=False)
    requests = [(7, 3), (5, 0), (4, 4), (40, 37)]
    plan = ragged_plan(layout, requests, True)
    check_plan(plan, layout, requests, True)
    tiles = plan.tiles()
    for r, (qo_len, kv_len) in enumerate(requests):
        for h in range(layout.num_kv_heads):
            rows = np.zeros(qo_len, np.int64)
            for t in np.flatnonzero((tiles["request"] == r) & (tiles["kv_head"] == h)):
                if tiles["kv_start"][t] == 0:  # one piece per query tile starts at KV 0
                    rows[tiles["q_start"][t] : tiles["q_end"][t]] += 1
                assert tiles["kv_end"][t] <= max(0, kv_len - qo_len + tiles["q_end"][t])
            assert (rows == 1).all(), (r, h, rows)


def test_plans_of_short_queries_ask_for_16_row_tiles():
    """tile_rows: 16 when every request fits one 16-row tile (qo_len x group <= 16), else the
    layout's; the tiles themselves are the same either way."""
    layout = PrefillLayout.from_settings(settings_for(4, 2, num_ctas=4), 4, paged=False, tile_rows=64)
    short = ragged_plan(layout, [(4, 30), (1, 9), (2, 2)], causal=True)
    assert short.tile_rows == 16 and short.max_qo_len == 4
    long = ragged_plan(layout, [(5, 30), (1, 9)], causal=True)
    assert long.tile_rows == 64 and long.max_qo_len == 5
    small_layout = PrefillLayout.from_settings(settings_for(4, 2, num_ctas=4), 4, paged=False)
    for requests in ([(4, 30), (1, 9), (2, 2)], [(5, 30), (1, 9)]):
        a, b = ragged_plan(layout, requests, True), ragged_plan(small_layout, requests, True)
        if a.tile_rows == 16:
            assert all((a.tiles()[k] == b.tiles()[k]).all() for k in a.tiles())
