"""Decode planner properties over many batches (no kernels): coverage, capacities, slots and merges,
fixed buffer sizes, deterministic invariance, and never worse than the anchors."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tilegraph.planner.anchors import anchors, chunk_groups, flashinfer_decode, longest_first, lpt_assign, lpt_blocks
from tilegraph.planner import decode
from tilegraph.planner.decode import plan_decode
from tilegraph.planner.layout import DecodeLayout
from tilegraph.planner.plan import TILE_OVERHEAD_TOKENS, Plan, ideal_makespan

NUM_PAGES = 1 << 20


def page_table(kv_len: list[int], page_size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """kv_indptr, kv_indices (random pages, a few spare entries), kv_last_page_len (junk for empty requests)."""
    pages = [-(-n // page_size) for n in kv_len]
    kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    kv_indices = rng.integers(0, NUM_PAGES, int(kv_indptr[-1]) + 3).astype(np.int32)
    last = [(n - 1) % page_size + 1 if n else int(rng.integers(-5, 5)) for n in kv_len]
    return kv_indptr, kv_indices, np.array(last, dtype=np.int32)


def make_layout(num_ctas: int, batch: int, page_refs: int, page_size: int, kv_heads: int, deterministic: bool) -> DecodeLayout:
    return DecodeLayout(num_ctas=num_ctas, max_batch_size=max(batch, 1), max_page_refs=max(page_refs, 1),
                        page_size=page_size, num_kv_heads=kv_heads, group_size=2, head_dim=64,
                        deterministic=deterministic)  # fmt: skip


def plan_for(kv_len: list[int], layout: DecodeLayout, seed: int = 0) -> tuple[Plan, tuple[np.ndarray, ...]]:
    table = page_table(kv_len, layout.page_size, np.random.default_rng(seed))
    return plan_decode(layout, *table, num_pages=NUM_PAGES, serial=7), table


def tiles_of(plan: Plan) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
    """(request, kv_head) -> [(token_start, token_end, slot)] in token order."""
    out: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    n = plan.num_tiles
    for r, h, s, e, slot in zip(plan.request[:n], plan.kv_head[:n], plan.token_start[:n], plan.token_end[:n], plan.slot[:n]):
        out.setdefault((int(r), int(h)), []).append((int(s), int(e), int(slot)))
    return {key: sorted(value) for key, value in out.items()}


def live_words(plan: Plan) -> dict[str, list[int]]:
    """The live part of every section (the tails are undefined and never read)."""
    n, m, b = plan.num_tiles, plan.num_merges, plan.batch_size
    live = {"header": 8, "cta_tile_indptr": plan.num_ctas + 1, "merge_slot_indptr": m + 1, "merge_request": m,
            "merge_kv_head": m, "kv_indptr": b + 1, "kv_indices": int(plan.section("kv_indptr")[b]), "kv_len": b}  # fmt: skip
    names = plan.layout.section_sizes()
    return {name: plan.section(name)[: live.get(name, n)].tolist() for name in names}


def check_plan(plan: Plan, kv_len: list[int], table: tuple[np.ndarray, ...]) -> None:
    layout = plan.layout
    batch, heads, n = len(kv_len), layout.num_kv_heads, plan.num_tiles
    assert plan.buffer.dtype == np.int32 and plan.buffer.shape == (layout.plan_words,)
    header = plan.section("header")
    assert header.tolist() == [n, plan.num_merges, batch, plan.num_slots, 7, 0, NUM_PAGES, 0]  # guard bound, no error
    assert n <= layout.tile_capacity and plan.num_merges <= layout.merge_capacity and plan.num_slots <= layout.slot_capacity
    # tiles grouped by CTA: CTAs without work have empty ranges, every live tile belongs to one CTA
    indptr = plan.cta_tile_indptr.astype(np.int64)
    assert indptr[0] == 0 and indptr[-1] == n and (np.diff(indptr) >= 0).all()
    assert all((plan.cta[indptr[c] : indptr[c + 1]] == c).all() for c in range(layout.num_ctas))  # Plan.cta, derived
    # exact coverage: every (request, kv_head, token) once; kv_len 0: exactly one empty tile
    pairs = tiles_of(plan)
    assert set(pairs) == {(r, h) for r in range(batch) for h in range(heads)}
    for (r, h), tiles in pairs.items():
        if kv_len[r] == 0:
            assert [t[:2] for t in tiles] == [(0, 0)]
            continue
        assert tiles[0][0] == 0 and tiles[-1][1] == kv_len[r]
        assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:])) and all(s < e for s, e, _ in tiles)
    # slots: unsplit -> -1; a split pair's tiles own the slots of exactly one merge entry, in token order
    merges = {}
    for m in range(plan.num_merges):
        key = (int(plan.merge_request[m]), int(plan.merge_kv_head[m]))
        assert key not in merges
        merges[key] = list(range(plan.merge_slot_indptr[m], plan.merge_slot_indptr[m + 1]))
    assert plan.merge_slot_indptr[0] == 0 and plan.merge_slot_indptr[plan.num_merges] == plan.num_slots
    for key, tiles in pairs.items():
        slots = [t[2] for t in tiles]
        if len(tiles) == 1:
            assert slots == [-1] and key not in merges
        else:
            assert merges.pop(key) == slots and len(slots) >= 2
    assert not merges
    # the page table, copied in
    assert plan.kv_len[:batch].tolist() == kv_len
    assert (plan.section("kv_indptr")[: batch + 1] == table[0]).all()
    nnz = int(table[0][-1])
    assert (plan.section("kv_indices")[:nnz] == table[1][:nnz]).all()
    assert plan.max_page_index == (int(table[1][:nnz].max()) if nnz else -1)
    # stats
    cost = plan.token_end[:n].astype(np.int64) - plan.token_start[:n] + TILE_OVERHEAD_TOKENS
    loads = np.bincount(plan.cta[:n], weights=cost, minlength=layout.num_ctas)
    assert plan.makespan == (int(loads.max()) if n else 0) and (plan.cta_loads() == loads).all()
    assert plan.ideal == pytest.approx(ideal_makespan(np.array(kv_len), heads, layout.num_ctas))
    assert 0 < plan.balance <= 1 + 1e-12
    with pytest.raises(ValueError):
        plan.request[0] = 1  # read-only views


lengths_strategy = st.one_of(
    st.lists(st.integers(0, 5000), max_size=64),
    st.lists(st.integers(0, 40), max_size=64),
    st.tuples(st.integers(1, 64), st.integers(0, 5000)).map(lambda t: [t[1]] * t[0]),
    st.tuples(st.integers(2000, 5000), st.lists(st.integers(0, 300), max_size=63)).map(lambda t: [t[0], *t[1]]),
    st.lists(st.sampled_from([0, 1, 2, 15, 16, 17, 31, 33, 4999, 5000]), max_size=64),
)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    kv_len=lengths_strategy,
    page_size=st.sampled_from([1, 16, 7]),
    kv_heads=st.integers(1, 12),  # beyond VECTOR_MOST_HEADS: the pass that stores a word at a time
    num_ctas=st.integers(1, 300),
    deterministic=st.booleans(),
    batch_slack=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_plan_properties(kv_len, page_size, kv_heads, num_ctas, deterministic, batch_slack, seed):
    pages = sum(-(-n // page_size) for n in kv_len)
    layout = make_layout(num_ctas, len(kv_len) + batch_slack, pages + batch_slack, page_size, kv_heads, deterministic)
    plan, table = plan_for(kv_len, layout, seed)
    check_plan(plan, kv_len, table)
    if not deterministic:
        for anchor in anchors(np.array(kv_len, dtype=np.int64), page_size, kv_heads, num_ctas):
            assert plan.makespan <= anchor.makespan, anchor


@settings(deadline=None, max_examples=60)
@given(
    request=st.integers(0, 5000),
    others=st.lists(st.integers(0, 5000), max_size=40),
    position=st.integers(0, 40),
    kv_heads=st.integers(1, 4),
    num_ctas=st.integers(1, 200),
)
def test_deterministic_ranges_do_not_depend_on_the_batch(request, others, position, kv_heads, num_ctas):
    position = min(position, len(others))
    batch = [*others[:position], request, *others[position:]]
    layout = make_layout(num_ctas, 41, sum(-(-n // 16) for n in batch), 16, kv_heads, deterministic=True)
    alone = tiles_of(plan_for([request], layout)[0])
    batched = tiles_of(plan_for(batch, layout)[0])
    for head in range(kv_heads):
        ranges_alone = [t[:2] for t in alone[(0, head)]]
        assert [t[:2] for t in batched[(position, head)]] == ranges_alone
        assert (len(ranges_alone) > 1) == all(t[2] >= 0 for t in batched[(position, head)])


def test_buffer_size_is_fixed_by_the_layout():
    layout = make_layout(264, 64, 64 * 400, 16, 8, deterministic=False)
    sizes = {plan_for(lengths, layout)[0].buffer.shape for lengths in ([], [1], [5000] * 64, [32000] + [10] * 63)}
    assert sizes == {(layout.plan_words,)}


def test_empty_batch():
    layout = make_layout(4, 8, 8, 16, 2, deterministic=False)
    plan, table = plan_for([], layout)
    check_plan(plan, [], table)
    assert plan.num_tiles == 0 and plan.makespan == 0 and plan.tiles_per_cta().tolist() == [0] * 4


def test_skewed_mix_beats_flashinfer_decode():
    """One 32k request among 63 short ones, kv_heads 8, 264 CTAs: FlashInfer's decode planner does not
    split (64 x 8 >= 264) and the long request dominates; ours splits it across the CTAs."""
    kv_len = [32768] + [int(n) for n in np.random.default_rng(3).integers(100, 1000, 63)]
    layout = make_layout(264, 64, sum(-(-n // 16) for n in kv_len), 16, 8, deterministic=False)
    plan, table = plan_for(kv_len, layout)
    check_plan(plan, kv_len, table)
    theirs = flashinfer_decode(np.array(kv_len), 16, 8, 264)
    assert theirs.balance < 0.1 and plan.balance > 0.95
    assert plan.num_merges >= 8  # the long request is split for every kv_head


def test_full_capacity_never_overflows():
    """Every bound at its limit at once: max batch, every page reference, many and few CTAs."""
    for num_ctas, deterministic in ((1, False), (7, False), (300, False), (300, True), (3, True)):
        kv_len = [16 * 40] * 31 + [16 * 900]
        layout = make_layout(num_ctas, 32, sum(-(-n // 16) for n in kv_len), 16, 8, deterministic)
        plan, table = plan_for(kv_len, layout)
        check_plan(plan, kv_len, table)


def test_plans_that_fill_the_tile_sections_are_whole():
    """Packed plans with at most VECTOR_SLACK_WORDS tiles to spare: the 16-byte stores of their last
    whole pairs run past the tile capacity into the layout's slack, not into the next section (with
    no slack these plans lose the first tiles' kv_head, start or slot words)."""
    rng = np.random.default_rng(11)
    full = 0
    for _ in range(400):
        kv_heads, num_ctas, batch = int(rng.choice([1, 2, 4, 8])), int(rng.integers(2, 40)), int(rng.integers(1, 12))
        kv_len = rng.integers(1, 400, size=batch).tolist()
        layout = make_layout(num_ctas, batch, sum(-(-n // 16) for n in kv_len), 16, kv_heads, False)
        plan, table = plan_for(kv_len, layout)
        if plan.num_tiles >= layout.tile_capacity - 3:  # a 16-byte store reaches 3 words past its first
            full += 1
            check_plan(plan, kv_len, table)
    assert full >= 30


@pytest.mark.parametrize("kv_heads", [1, 3, 8])
def test_the_vector_and_scalar_passes_write_the_same_plan(kv_heads):
    """The packing's two compiled passes (16-byte stores of whole pairs, or a store a word) write the
    same live words for the same batch."""
    rng = np.random.default_rng(kv_heads)
    lengths = rng.lognormal(6.5, 1.5, size=300).astype(np.int64)
    layout = make_layout(96, 300, int(sum(-(-n // 16) for n in lengths)), 16, kv_heads, False)
    params, words = decode._layout_params(layout)
    order = longest_first(lengths)
    total = kv_heads * (int(lengths.sum()) + len(lengths) * TILE_OVERHEAD_TOKENS)
    capacity = decode._capacity_range(total, len(lengths), kv_heads, layout.num_ctas)[1]
    written = []
    for scalar_heads in (None, kv_heads):
        buf = np.full(words, -99, np.int32)
        result = decode._pack(capacity, True, order, lengths[order], kv_heads, layout.num_ctas, layout.tile_capacity,
                              layout.merge_capacity, total, np.empty(300, np.int64), np.empty(300, np.int64), buf,
                              params[decode.P_OFFSETS:], scalar_heads)  # fmt: skip
        assert result[0]
        plan = Plan(layout, buf, 7, len(lengths), *result[1:5], 1.0, -1, "block_table")
        written.append({name: words for name, words in live_words(plan).items() if not name.startswith("kv_")})
    assert written[0] == written[1]


def test_torch_and_numpy_inputs_give_the_same_plan():
    kv_len = [0, 17, 5000, 3, 64]
    layout = make_layout(16, 5, 400, 16, 2, deterministic=False)
    plan, table = plan_for(kv_len, layout)
    again = plan_decode(layout, *(torch.from_numpy(a) for a in table), num_pages=NUM_PAGES, serial=7)
    assert live_words(again) == live_words(plan) and again.makespan == plan.makespan
    assert "5 requests" in repr(plan) and plan.section("header")[4] == 7


def test_torch_views_give_the_numpy_plan():
    """Contiguous int32 CPU tensors reach the njit core as (address, length), not as numpy views
    (validation.index_input): a slice at a storage offset must read its own entries, and a strided
    (non-contiguous) view, taken through numpy, its strided ones -- on all three page-table paths.
    Fails if the address ignores the offset or a strided view is read as contiguous."""
    from tilegraph.planner.decode import plan_decode_block_table, plan_decode_device

    kv_len = [0, 17, 5000, 3, 64, 900, 31]
    layout = make_layout(16, len(kv_len), 500, 16, 2, deterministic=False)
    plan, table = plan_for(kv_len, layout)

    def offset_view(a: np.ndarray) -> torch.Tensor:  # the entries after 3 poison ones
        return torch.from_numpy(np.concatenate([np.full(3, -5, np.int32), a]))[3:]

    def strided_view(a: np.ndarray) -> torch.Tensor:  # every other entry of an interleaved tensor
        both = np.stack([a, np.full_like(a, -5)], axis=1).reshape(-1)
        return torch.from_numpy(both)[::2]

    for view in (offset_view, strided_view):
        tensors = [view(a) for a in table]
        assert tensors[0].is_contiguous() == (view is offset_view)
        again = plan_decode(layout, *tensors, num_pages=NUM_PAGES, serial=7)
        assert live_words(again) == live_words(plan) and again.makespan == plan.makespan, view.__name__
        device = plan_decode_device(layout, tensors[0], tensors[2], len(table[1]), num_pages=NUM_PAGES, serial=7)
        assert device.makespan == plan.makespan and device.num_tiles == plan.num_tiles, view.__name__
        seq_lens = view(np.array(kv_len, np.int32))
        blocks = plan_decode_block_table(layout, seq_lens, 400, 400, 400 * len(kv_len), num_pages=NUM_PAGES, serial=7)
        assert blocks.makespan == plan.makespan and blocks.num_tiles == plan.num_tiles, view.__name__


def packing_makespan(kv_len: list[int], layout: DecodeLayout) -> int:
    """The planner's own packing alone (before it compares the anchors)."""
    lengths = np.array(kv_len, dtype=np.int64)
    params, words = decode._layout_params(layout)
    total = layout.num_kv_heads * (int(lengths.sum()) + len(kv_len) * TILE_OVERHEAD_TOKENS)
    order = longest_first(lengths)
    found, *_, makespan = decode._search_pack(
        order, lengths[order], layout.num_kv_heads, layout.num_ctas, layout.tile_capacity,
        layout.merge_capacity, total, decode.NO_MAKESPAN, np.empty(words, np.int32), params[decode.P_OFFSETS:],
        np.empty(len(kv_len), np.int64), np.empty(len(kv_len), np.int64))  # fmt: skip
    assert found
    return makespan


@pytest.mark.parametrize("num_ctas, kv_heads", [(264, 8), (132, 8), (100, 3), (60, 4)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_plans_written_from_block_level_schedules_are_whole(num_ctas, kv_heads, deterministic):
    """Anchor and deterministic schedules are planned on blocks of gcd(kv_heads, num_ctas) CTAs and
    written block by block (8, 4, 1 and 4 CTAs here): on ShareGPT-like batches, some of which an
    anchor wins, every plan covers each token once, groups its tiles by CTA and has the loads its
    makespan says."""
    rng = np.random.default_rng(1)
    anchor_won = 0
    for _ in range(8):
        kv_len = np.clip(np.rint(rng.lognormal(np.log(700), 1.0, 256)), 16, 32768).astype(int).tolist()
        layout = make_layout(num_ctas, 256, sum(-(-n // 16) for n in kv_len), 16, kv_heads, deterministic)
        plan, table = plan_for(kv_len, layout)
        check_plan(plan, kv_len, table)
        if not deterministic:
            anchor_won += plan.makespan < packing_makespan(kv_len, layout)
    assert anchor_won or deterministic


def reference_anchor(kv_len: list[int], kv_heads: int, num_ctas: int, chunk: int) -> int:
    """Both anchors as their docstring says, with a plain heap: chunk, longest request first, onto the least-loaded CTA."""
    loads = [(0, cta) for cta in range(num_ctas)]
    for length in sorted(kv_len, reverse=True):
        pieces = [length] if chunk == 0 or length <= chunk else [chunk] * (length // chunk) + [length % chunk] * (length % chunk > 0)
        for tokens in pieces:
            for _ in range(kv_heads):
                load, cta = heapq.heappop(loads)
                heapq.heappush(loads, (load + tokens + TILE_OVERHEAD_TOKENS, cta))
    return max(load for load, _ in loads)


@settings(deadline=None, max_examples=200)
@given(kv_len=lengths_strategy, page_size=st.sampled_from([1, 16, 7]), kv_heads=st.integers(1, 8), num_ctas=st.integers(1, 300))
def test_anchors_match_a_plain_reference(kv_len, page_size, kv_heads, num_ctas):
    decode, persistent = anchors(np.array(kv_len, dtype=np.int64), page_size, kv_heads, num_ctas)
    pages = [-(-n // page_size) for n in kv_len]
    chunk_pages = 0  # FlashInfer decode: no split once B * kv_heads fills the grid, else the smallest chunk that fits it
    if kv_len and len(kv_len) * kv_heads < num_ctas:
        low = -(-128 // page_size)
        chunk_pages = next(c for c in range(low, max(low, *pages) + 1)
                           if kv_heads * sum(max(1, -(-p // c)) for p in pages) <= num_ctas)  # fmt: skip
    assert decode.makespan == reference_anchor(kv_len, kv_heads, num_ctas, chunk_pages * page_size)
    share = -(-kv_heads * sum(kv_len) // num_ctas)
    chunk = page_size * max(1, -(-share // page_size))
    assert persistent.makespan == reference_anchor(kv_len, kv_heads, num_ctas, chunk)
    assert persistent.chunk_tokens == (chunk if any(n > chunk for n in kv_len) else None)


@settings(deadline=None, max_examples=150)
@given(kv_len=lengths_strategy, kv_heads=st.integers(1, 8), num_ctas=st.integers(1, 300), chunk=st.sampled_from([0, 64, 700]))
def test_lpt_assignment_is_least_loaded_tile_by_tile(kv_len, kv_heads, num_ctas, chunk):
    """lpt_assign plans block-CTAs (gcd(kv_heads, num_ctas) CTAs in lockstep) and expands them: replayed
    tile by tile, every tile lands on a CTA that is least loaded at that moment, and the loads' maximum is
    the makespan it returns and the plain heap's. Fails if a block's tiles are expanded onto the wrong
    CTAs or the block-level loads are not the real ones."""
    lengths = np.array(kv_len, dtype=np.int64)
    groups = chunk_groups(lengths, longest_first(lengths), kv_heads, chunk)
    g_tokens, g_count = groups[3], groups[4]
    assignment = np.full(int(g_count.sum()), -7, dtype=np.int64)
    makespan = lpt_assign(g_tokens, groups[2], kv_heads, num_ctas, assignment)
    loads = np.zeros(num_ctas, dtype=np.int64)
    tile = 0
    for tokens, count in zip(g_tokens.tolist(), g_count.tolist()):
        for _ in range(count):
            cta = int(assignment[tile])
            assert 0 <= cta < num_ctas and loads[cta] == loads.min(), (tile, cta)
            loads[cta] += tokens + TILE_OVERHEAD_TOKENS
            tile += 1
    assert makespan == (int(loads.max()) if tile else 0) == reference_anchor(kv_len, kv_heads, num_ctas, chunk)


@settings(deadline=None, max_examples=150)
@given(kv_len=lengths_strategy, kv_heads=st.integers(1, 8), num_ctas=st.integers(1, 300), chunk=st.sampled_from([1, 64, 700, 1000]),
       ceiling=st.integers(1, 20000))  # fmt: skip
@example(kv_len=[2500, 130, 64], kv_heads=2, num_ctas=3, chunk=1000, ceiling=1 << 40)  # a cut request's rest comes right after it
def test_lpt_cuts_requests_as_it_places_them(kv_len, kv_heads, num_ctas, chunk, ceiling):
    """The anchors' LPT reads request lengths and cuts them into chunks as it goes (no chunk_groups
    built): the same block-level assignment and makespan as on chunk_groups' groups. Stopped at a
    ceiling, the makespan is the full one when below it, else at least the ceiling (the anchor then
    loses, its assignment unused). Fails if a request's last chunk is placed anywhere but right after
    its full chunks, or if the ceiling stops a schedule that stays below it."""
    lengths = np.array(kv_len, dtype=np.int64)
    order = longest_first(lengths)
    groups = chunk_groups(lengths, order, kv_heads, chunk)
    tiles = int(groups[4].sum())
    expected_units, units = np.full(tiles, -7, dtype=np.int64), np.full(tiles, -7, dtype=np.int64)
    makespan, block = lpt_blocks(groups[3], groups[2], kv_heads, num_ctas, expected_units)
    assert lpt_blocks(lengths[order], lengths[:0], kv_heads, num_ctas, units, chunk) == (makespan, block)
    assert np.array_equal(units, expected_units)
    stopped, _ = lpt_blocks(lengths[order], lengths[:0], kv_heads, num_ctas, units, chunk, ceiling)
    assert stopped == makespan if makespan < ceiling else ceiling <= stopped <= makespan


@settings(deadline=None, max_examples=200)
@given(kv_len=lengths_strategy, page_size=st.sampled_from([1, 16, 7]), kv_heads=st.integers(1, 8), num_ctas=st.integers(1, 300))
def test_anchor_lower_bound_holds(kv_len, page_size, kv_heads, num_ctas):
    """The planner skips an anchor whose lower bound is not below its packing: the bound must never
    exceed the anchor's own makespan (a bound too high would drop a better anchor schedule)."""
    for anchor in anchors(np.array(kv_len, dtype=np.int64), page_size, kv_heads, num_ctas):
        assert anchor.lower_bound <= anchor.makespan, anchor


@pytest.mark.parametrize("batch, num_ctas", [(256, 264), (4096, 264), (100, 7)])
def test_anchor_lower_bound_is_exact_for_equal_lengths(batch, num_ctas):
    """Equal requests: the pigeonhole bound is the anchors' makespan, so the planner need not run
    them when its packing is at least as good (the bound without it, the even spread, is lower)."""
    kv_len = np.full(batch, 1000, dtype=np.int64)
    for anchor in anchors(kv_len, 16, 8, num_ctas):
        tiles = batch * 8
        assert anchor.lower_bound == anchor.makespan == -(-tiles // num_ctas) * (1000 + TILE_OVERHEAD_TOKENS)
        assert anchor.lower_bound > -(-tiles * (1000 + TILE_OVERHEAD_TOKENS) // num_ctas) or tiles % num_ctas == 0
