"""The LPT's two least-loaded lookups (planner/lpt.py): the winner tree up to TREE_MOST_CTAS block-CTAs,
the bucket queue beyond. Each is replayed tile by tile against the plain statement: every tile on a
least-loaded CTA, the makespan the loads' maximum and a heap's."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from tilegraph.planner.anchors import chunk_groups, longest_first
from tilegraph.planner.lpt import TREE_MOST_CTAS, lpt_blocks
from tilegraph.planner.plan import TILE_OVERHEAD_TOKENS


def heap_makespan(costs: list[int], num_ctas: int) -> int:
    loads = [(0, cta) for cta in range(num_ctas)]
    for cost in costs:
        load, cta = heapq.heappop(loads)
        heapq.heappush(loads, (load + cost, cta))
    return max(load for load, _ in loads)


# (kv_heads, num_ctas) -> block-CTAs num_ctas // gcd: both sides of TREE_MOST_CTAS, one CTA, and a
# tree whose leaves are not a power of two
SHAPES = [(1, 1), (3, 2), (8, 264), (1, 33), (2, 2 * TREE_MOST_CTAS), (1, TREE_MOST_CTAS + 1), (8, 8 * 300 + 4), (5, 300)]


@pytest.mark.parametrize("kv_heads, num_ctas", SHAPES)
@pytest.mark.parametrize("chunk", [0, 700])
def test_every_block_tile_goes_to_a_least_loaded_block_cta(kv_heads, num_ctas, chunk):
    """Block-level placements replayed: the CTA taken is least loaded (the tree: the lowest such CTA),
    and the makespan is the loads' maximum and a heap's. Fails if the tree's path replay skips a level
    or a sibling, or if the bucket queue's batches overfill a CTA."""
    rng = np.random.default_rng([kv_heads, num_ctas, chunk])
    for batch in (1, 7, 200, 1500):
        lengths = rng.lognormal(6.5, 1.2, size=batch).astype(np.int64) + rng.integers(0, 3, size=batch)
        order = longest_first(lengths)
        groups = chunk_groups(lengths, order, kv_heads, chunk)
        tiles = int(groups[4].sum())
        units = np.full(tiles, -7, dtype=np.int64)
        makespan, block = lpt_blocks(lengths[order], lengths[:0], kv_heads, num_ctas, units, chunk)
        machines, per_chunk = num_ctas // block, kv_heads // block
        costs = [int(t) + TILE_OVERHEAD_TOKENS for t, n in zip(groups[3], groups[4]) for _ in range(n // block)]
        loads = np.zeros(machines, dtype=np.int64)
        for tile, cost in enumerate(costs):
            cta = int(units[tile])
            assert 0 <= cta < machines and loads[cta] == loads.min(), (batch, tile, cta)
            if machines <= TREE_MOST_CTAS:
                assert cta == int(np.argmin(loads)), (batch, tile)
            loads[cta] += cost
        assert len(costs) * block == tiles and per_chunk * block == kv_heads
        assert makespan == int(loads.max()) == heap_makespan(costs, machines)


@pytest.mark.parametrize("kv_heads, num_ctas", [(8, 264), (1, 300)])
def test_a_ceiling_stops_either_lookup_only_at_or_above_it(kv_heads, num_ctas):
    rng = np.random.default_rng(num_ctas)
    lengths = rng.lognormal(6.5, 1.2, size=400).astype(np.int64)
    order = longest_first(lengths)
    full, _ = lpt_blocks(lengths[order], lengths[:0], kv_heads, num_ctas, lengths[:0])
    for ceiling in (full - 1, full, full + 1, full // 2):
        stopped, _ = lpt_blocks(lengths[order], lengths[:0], kv_heads, num_ctas, lengths[:0], 0, ceiling)
        assert stopped == full if full < ceiling else ceiling <= stopped <= full
