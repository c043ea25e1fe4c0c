"""The decode planner's njit core works in the per-thread state array it is handed (decode.py's
``_state_parts``): a plan written by the packing allocates nothing inside the core, and work arrays
left dirty by an earlier plan never leak into the next one."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit
from numba.core.runtime import _nrt_python, nrt

from tilegraph.planner import decode
from tilegraph.planner.anchors import SORT_COUNT_WORDS, longest_first, sort_longest_first
from tilegraph.planner.decode import plan_decode_block_table
from tilegraph.planner.layout import DecodeLayout
from tilegraph.settings import Settings
from tilegraph.tools.bench.common import length_mix


@njit
def _same_arguments(seq_lens, row_stride, max_blocks, span, num_pages, serial, state, buf):
    """Does nothing with the block-table core's arguments: what the call itself allocates (numba
    wraps every array argument in a memory record)."""
    buf[0] = serial


def _allocations(call) -> int:
    call()  # compiled and warm
    before = nrt.rtsys.get_allocation_stats().alloc
    call()
    return nrt.rtsys.get_allocation_stats().alloc - before


@pytest.fixture
def allocation_stats():
    was_on = _nrt_python.memsys_stats_enabled()
    _nrt_python.memsys_enable_stats()
    yield
    if not was_on:
        _nrt_python.memsys_disable_stats()


@pytest.mark.parametrize("mix, batch", [("lognormal", 256), ("uniform", 256), ("equal", 16), ("lognormal", 1)])
def test_a_packed_plan_allocates_nothing_in_the_core(allocation_stats, mix, batch):
    """The sort, both anchors' bounds and LPTs and the packing take their arrays from the state: the
    core allocates as much as a function that only receives the same arguments (13 more blocks
    each plan at B=256 log-normal before the sort, the LPT tree and the packing shared it)."""
    rng = np.random.default_rng(3)
    lengths = [700] * batch if mix == "equal" else length_mix(mix, batch, rng)
    pages = sum(-(-x // 16) for x in lengths)
    settings = Settings(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16, max_batch_size=batch,
                        max_num_pages=pages, num_ctas=264)  # fmt: skip
    layout = DecodeLayout.from_settings(settings, 264)
    state, words, *_ = decode._core_inputs(layout)
    seq_lens = np.array(lengths, np.int32)
    buf = np.empty(words, np.int32)
    args = (seq_lens, 4096, 4096, 4096 * batch, pages, 0, state, buf)
    assert _allocations(lambda: decode._plan_core_blocks(*args)) == _allocations(lambda: _same_arguments(*args))
    plan = plan_decode_block_table(layout, seq_lens, 4096, 4096, 4096 * batch, pages)  # in the same state again
    n = plan.num_tiles
    covered = np.bincount(plan.request[:n], weights=plan.token_end[:n] - plan.token_start[:n], minlength=batch)
    assert covered.tolist() == [8 * length for length in lengths]
    assert plan.cta_loads().max() == plan.makespan


@pytest.mark.parametrize("batch", [1, 5, 300, 3000])
def test_the_sort_ignores_what_its_work_arrays_held(batch):
    """The sort into work arrays full of garbage (what an earlier plan left) gives the stable
    longest-first order and its lengths, like the allocating ``longest_first``."""
    rng = np.random.default_rng(batch)
    for lengths in (rng.integers(0, 40000, size=batch), rng.integers(5, 9, size=batch), np.full(batch, 77)):
        lengths = lengths.astype(np.int32)
        poison = lambda n: rng.integers(-(2**40), 2**40, size=n)  # noqa: E731
        order, by_length = sort_longest_first(lengths, poison(batch + 9), poison(batch + 9), poison(batch + 9),
                                              poison(SORT_COUNT_WORDS))  # fmt: skip
        expected = np.lexsort((np.arange(batch), -lengths.astype(np.int64)))
        assert order.tolist() == expected.tolist() == longest_first(lengths).tolist()
        assert by_length.tolist() == lengths[expected].tolist()
