"""The planner's shortcuts are exact: the probed lower bound (it lets a plan skip an anchor) never
exceeds any schedule's makespan, and the per-thread scratch rows carry nothing from one plan to
the next."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from tilegraph.planner.anchors import _might_fit, anchors, chunk_groups, longest_first, makespan_lower_bound
from tilegraph.planner.decode import plan_decode_block_table
from tilegraph.planner.layout import DecodeLayout
from tilegraph.planner.plan import TILE_OVERHEAD_TOKENS


def optimal_makespan(costs: list[int], num_ctas: int) -> int:
    """The least makespan over every assignment of ``costs`` to ``num_ctas`` CTAs (tiny inputs)."""
    best = sum(costs)
    for assignment in itertools.product(range(num_ctas), repeat=len(costs)):
        loads = [0] * num_ctas
        for cost, cta in zip(costs, assignment):
            loads[cta] += cost
        best = min(best, max(loads))
    return best


def tile_costs(kv_len: np.ndarray, num_kv_heads: int, chunk: int) -> list[int]:
    groups = chunk_groups(kv_len, longest_first(kv_len), num_kv_heads, chunk)
    return [int(tokens) + TILE_OVERHEAD_TOKENS for tokens, count in zip(groups[3], groups[4]) for _ in range(count)]


@settings(deadline=None, max_examples=150)
@given(kv_len=st.lists(st.integers(0, 400), min_size=1, max_size=4), num_kv_heads=st.integers(1, 2),
       num_ctas=st.integers(1, 3), chunk=st.sampled_from([0, 64, 150]), slack=st.integers(-40, 400))  # fmt: skip
def test_probed_bound_never_exceeds_the_optimal_makespan(kv_len, num_kv_heads, num_ctas, chunk, slack):
    """Whatever the probe, the bound is one: no schedule of the chunked tiles does better (a bound
    raised to a probe above the optimum would skip an anchor that wins)."""
    lengths = np.array(kv_len, dtype=np.int64)
    costs = tile_costs(lengths, num_kv_heads, chunk)
    assume(len(costs) <= 7)  # keep the brute force small
    optimum = optimal_makespan(costs, num_ctas)
    for probe in (optimum + slack, optimum, optimum + 1):
        bound, tiles = makespan_lower_bound(lengths, longest_first(lengths), num_kv_heads, num_ctas, chunk, probe)
        assert tiles == len(costs)
        assert bound <= optimum, (probe, optimum)


def reference_bound(kv_len: list[int], num_kv_heads: int, num_ctas: int, chunk: int) -> int:
    """makespan_lower_bound's three bounds as its docstring states them, tile by tile, with plain divisions."""
    costs = []  # the tile stream: full chunks first, then each request's last or only tile, longest first
    for length in kv_len:
        if chunk and length > chunk:
            costs += [chunk + TILE_OVERHEAD_TOKENS] * (length // chunk * num_kv_heads)
    for length in sorted(kv_len, reverse=True):
        last = length % chunk if chunk and length > chunk else length
        if not (chunk and length > chunk and last == 0):
            costs += [last + TILE_OVERHEAD_TOKENS] * num_kv_heads
    bound = -(-sum(costs) // num_ctas)
    full = sum(length // chunk for length in kv_len if chunk and length > chunk) * num_kv_heads
    big = full or min(num_kv_heads, len(costs))  # the full chunks, else the longest request's tiles
    cheapest = small_cost = None  # min(costs[:n]) and min(costs[big:n])
    for n in range(1, len(costs) + 1):
        cheapest = costs[n - 1] if cheapest is None else min(cheapest, costs[n - 1])
        if n > big:
            small_cost = costs[n - 1] if small_cost is None else min(small_cost, costs[n - 1])
        if n % num_kv_heads == 0 or n == full:
            bound = max(bound, -(-n // num_ctas) * cheapest)
        if n > big and big < num_ctas and (n - full) % num_kv_heads == 0:
            big_cost = min(costs[:big])
            bound = max(bound, min(big_cost + small_cost, -(-(n - big) // (num_ctas - big)) * small_cost))
    return bound


@settings(deadline=None, max_examples=300)
@given(kv_len=st.lists(st.integers(0, 3000), min_size=1, max_size=40), num_kv_heads=st.integers(1, 8),
       num_ctas=st.integers(1, 100), chunk=st.sampled_from([0, 16, 100, 1000]))  # fmt: skip
def test_bound_matches_its_plain_statement(kv_len, num_kv_heads, num_ctas, chunk):
    """The stepped quotients (no division per request) give the bound the docstring states."""
    lengths = np.array(kv_len, dtype=np.int64)
    bound, tiles = makespan_lower_bound(lengths, longest_first(lengths), num_kv_heads, num_ctas, chunk)
    assert bound == reference_bound(kv_len, num_kv_heads, num_ctas, chunk)


@settings(deadline=None, max_examples=200)
@given(kv_len=st.one_of(st.lists(st.integers(0, 5000), max_size=300), st.lists(st.integers(0, 200), max_size=12)),
       num_kv_heads=st.integers(1, 8), num_ctas=st.one_of(st.integers(1, 12), st.integers(1, 300)),
       chunk=st.sampled_from([0, 16, 700, 2500, 4900, 1 << 40]))  # fmt: skip
@example(kv_len=[178, 182], num_kv_heads=6, num_ctas=5, chunk=0)  # 12 tiles >= 210 on 5 CTAs: 3 on one, 630
@example(kv_len=[1651, 1962, 149, 144, 59, 22, 135, 60, 11, 56, 78, 187, 35, 173, 161, 50, 82, 74, 131, 95, 72, 9, 164, 3,
                 13, 113, 129], num_kv_heads=1, num_ctas=18, chunk=250)  # pigeonhole levels after a split prefix
@example(kv_len=[1600, 2655, 146, 60], num_kv_heads=2, num_ctas=29, chunk=150)  # the prefix's tiles count
@example(kv_len=[168, 94], num_kv_heads=4, num_ctas=5, chunk=1000)  # big-and-small from the second request
def test_bound_by_levels_matches_its_plain_statement_on_long_batches(kv_len, num_kv_heads, num_ctas, chunk):
    """After the split requests (a prefix of the longest-first order) the bound steps level by level,
    not request by request: on long batches, with a split prefix or none, levels narrower than a
    request's tiles (few CTAs) or wider, it is the bound the docstring states."""
    lengths = np.array(kv_len, dtype=np.int64)
    bound, tiles = makespan_lower_bound(lengths, longest_first(lengths), num_kv_heads, num_ctas, chunk)
    assert bound == reference_bound(kv_len, num_kv_heads, num_ctas, chunk)


def fits_by_brute_force(big: int, big_cost: int, small: int, small_cost: int, num_ctas: int, makespan: int) -> bool:
    """Whether ``big`` tiles of big_cost and ``small`` of small_cost fit ``num_ctas`` CTAs of ``makespan``."""
    for per_cta in itertools.product(range(big + 1), repeat=num_ctas):
        if sum(per_cta) != big or any(j * big_cost > makespan for j in per_cta):
            continue
        if sum((makespan - j * big_cost) // small_cost for j in per_cta) >= small:
            return True
    return False


@settings(deadline=None, max_examples=300)
@given(big=st.integers(1, 6), small=st.integers(1, 12), small_cost=st.integers(1, 9), extra=st.integers(0, 20),
       num_ctas=st.integers(1, 4), makespan=st.integers(1, 60))  # fmt: skip
def test_might_fit_only_says_no_when_nothing_fits(big, small, small_cost, extra, num_ctas, makespan):
    big_cost = small_cost + extra
    if not _might_fit(big, big_cost, small, small_cost, num_ctas, makespan):
        assert not fits_by_brute_force(big, big_cost, small, small_cost, num_ctas, makespan)


def test_might_fit_decides_a_case_the_other_bounds_miss():
    """4 CTAs of 10, 3 tiles of 6 and 7 of 3: 39 units fit the even spread (40), 3 tiles a CTA the
    pigeonhole (9 <= 10), and 10 >= 6 + 3 lets a big and a small share; yet a CTA with a big tile
    holds one small, so 3 bigs leave room for 3 + 3 smalls, not 7."""
    assert not fits_by_brute_force(3, 6, 7, 3, 4, 10)
    assert not _might_fit(3, 6, 7, 3, 4, 10)
    assert fits_by_brute_force(3, 6, 6, 3, 4, 10) and _might_fit(3, 6, 6, 3, 4, 10)


def test_the_probe_lets_a_skewed_batch_skip_the_anchor():
    """One 32k request among 4095 of 512: the packing's makespan is one the anchor cannot beat, but
    only the probed counting test shows it (without a probe the bound is below it)."""
    kv_len = np.array([32768] + [512] * 4095, dtype=np.int64)
    layout = DecodeLayout(num_ctas=264, max_batch_size=4096, max_page_refs=kv_len.sum() // 16 + 4096,
                          page_size=16, num_kv_heads=8, group_size=4, head_dim=128, deterministic=False)  # fmt: skip
    plan = plan_decode_block_table(layout, kv_len.astype(np.int32), 4096, 4096, 4096 * 4096, 1 << 20)
    order = longest_first(kv_len)
    plain, _ = makespan_lower_bound(kv_len, order, 8, 264, 0)
    probed, _ = makespan_lower_bound(kv_len, order, 8, 264, 0, plan.makespan)
    assert plain < plan.makespan <= probed
    for anchor in anchors(kv_len, 16, 8, 264):
        assert plan.makespan <= anchor.makespan


def live(plan) -> list[list[int]]:
    n = plan.num_tiles
    return [plan.cta_tile_indptr.tolist(), plan.request[:n].tolist(), plan.kv_head[:n].tolist(),
            plan.token_start[:n].tolist(), plan.token_end[:n].tolist(), plan.slot[:n].tolist(), plan.cta[:n].tolist()]  # fmt: skip


@pytest.mark.parametrize("deterministic", [False, True])
def test_scratch_rows_carry_nothing_between_plans(deterministic):
    """Plans reuse this thread's scratch rows: a batch plans the same after another batch, and in
    other threads planning at the same time."""
    rng = np.random.default_rng(5)
    layout = DecodeLayout(num_ctas=40, max_batch_size=300, max_page_refs=2000 * 300, page_size=16, num_kv_heads=4,
                          group_size=2, head_dim=64, deterministic=deterministic)  # fmt: skip
    batches = [rng.integers(0, 4000, size=int(rng.integers(1, 300))).astype(np.int32) for _ in range(6)]
    batches.append(np.array([30000] + [40] * 200, dtype=np.int32))

    def plan(kv_len):
        return live(plan_decode_block_table(layout, kv_len, 2000, 2000, 2000 * 300, 1 << 20))

    first = [plan(kv_len) for kv_len in batches]
    assert [plan(kv_len) for kv_len in reversed(batches)] == first[::-1]
    results: dict[int, list] = {}

    def worker(index: int) -> None:
        results[index] = [plan(kv_len) for kv_len in batches[index:] + batches[:index]]

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(3):
        assert results[index] == first[index:] + first[:index]


@settings(deadline=None, max_examples=200)
@given(kv_len=st.one_of(
    st.lists(st.integers(0, 70000), max_size=300),
    st.lists(st.sampled_from([0, 5, 512, 32768]), max_size=3000),
    st.lists(st.integers(0, 3000).map(lambda n: 64 * n + 4096 * 7 + 5), max_size=600),  # shared low and high bits
))
def test_longest_first_is_a_stable_sort(kv_len):
    """The radix sort (only the bits that differ between keys, two histograms, a scatter that keeps
    runs of equal digits in a register): longest first, ties by index, for odd and even batches,
    runs of equal lengths and lengths that share their low bits."""
    lengths = np.array(kv_len, dtype=np.int32)
    expected = np.argsort(-lengths.astype(np.int64), kind="stable")
    assert longest_first(lengths).tolist() == expected.tolist()

