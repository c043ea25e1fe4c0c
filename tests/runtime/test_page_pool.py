"""PagePool: random allocate/free/step sequences against a plain model of what each request holds,
plus the typed errors (exhaustion leaves the pool exactly as it was)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import tilegraph
from tilegraph.errors import InputError, PlanError, StateError
from tilegraph.page_pool import PagePool, PoolExhaustedError, UnknownRequestError


def make_pool(page_size: int = 4, max_num_pages: int = 16) -> PagePool:
    return PagePool(tilegraph.Settings(num_qo_heads=1, num_kv_heads=1, head_dim=16, page_size=page_size,
                                       max_num_pages=max_num_pages))  # fmt: skip


def snapshot(pool: PagePool) -> tuple:
    """Everything observable about the pool's state."""
    ids = pool.request_ids
    return pool.num_free_pages, tuple((rid, pool.kv_len(rid), tuple(pool.pages(rid))) for rid in ids)


class PoolMachine(RuleBasedStateMachine):
    """Model: kv_len per live request. Checked after every step: pages disjoint and in range,
    held + free = the whole pool, page counts match kv_len, page tables agree with both."""

    def __init__(self) -> None:
        super().__init__()
        self.page_size = 3
        self.max_num_pages = 12
        self.pool = make_pool(self.page_size, self.max_num_pages)
        self.model: dict[int, int] = {}
        self.ever_freed: set[int] = set()

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def needed(self, rid: int, n: int) -> int:
        old = self.model.get(rid, 0)
        return self.pages_for(old + n) - self.pages_for(old)

    @rule(rid=st.integers(0, 7), n=st.integers(0, 2 * 3 + 1))
    def allocate(self, rid: int, n: int) -> None:
        before = snapshot(self.pool)
        if self.needed(rid, n) > self.pool.num_free_pages:
            with pytest.raises(PoolExhaustedError, match="max_num_pages=12"):
                self.pool.allocate(rid, n)
            assert snapshot(self.pool) == before
            return
        old = self.model.get(rid, 0)
        positions = self.pool.allocate(rid, n)
        assert positions.dtype == np.int32 and positions.tolist() == list(range(old, old + n))
        self.model[rid] = old + n

    @rule(rids=st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True),
          counts=st.lists(st.integers(0, 5), min_size=4, max_size=4), pad=st.integers(0, 3))  # fmt: skip
    def allocate_step(self, rids: list[int], counts: list[int], pad: int) -> None:
        counts = counts[: len(rids)]
        before = snapshot(self.pool)
        if sum(self.needed(r, n) for r, n in zip(rids, counts)) > self.pool.num_free_pages:
            with pytest.raises(PoolExhaustedError, match="max_num_pages=12"):
                self.pool.allocate_step(rids, counts)
            assert snapshot(self.pool) == before
            return
        step = self.pool.allocate_step(rids, counts, pad_to=sum(counts) + pad)
        expected = []
        for b, (r, n) in enumerate(zip(rids, counts)):
            old = self.model.get(r, 0)
            expected += [(b, p) for p in range(old, old + n)]
        got = list(zip(step.batch_indices.tolist(), step.positions.tolist()))
        assert got == expected + [(-1, 0)] * pad
        assert step.batch_indices.dtype == np.int32 and step.positions.dtype == np.int32
        for r, n in zip(rids, counts):
            self.model[r] = self.model.get(r, 0) + n

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.model)))
        free_before = self.pool.num_free_pages
        held = self.pool.pages(rid)
        self.pool.free(rid)
        del self.model[rid]
        self.ever_freed.add(rid)
        assert self.pool.num_free_pages == free_before + len(held)
        with pytest.raises(UnknownRequestError, match="already freed"):
            self.pool.free(rid)

    @rule(rid=st.integers(0, 7))
    def query_unknown(self, rid: int) -> None:
        if rid not in self.model:
            with pytest.raises(UnknownRequestError, match=f"request {rid} is not in the pool"):
                self.pool.kv_len(rid)

    @invariant()
    def pages_are_owned_once(self) -> None:
        held = [page for rid in self.model for page in self.pool.pages(rid)]
        assert len(held) == len(set(held)), "a page is held by two live requests"
        assert all(0 <= page < self.max_num_pages for page in held)
        assert len(held) + self.pool.num_free_pages == self.max_num_pages, "pages leaked or duplicated"
        assert set(self.pool.request_ids) == set(self.model)
        for rid, tokens in self.model.items():
            assert self.pool.kv_len(rid) == tokens
            assert len(self.pool.pages(rid)) == self.pages_for(tokens)

    @invariant()
    def page_table_matches(self) -> None:
        ids = sorted(self.model, reverse=True)
        table = self.pool.page_table(ids)
        assert all(a.dtype == np.int32 for a in table)
        assert table.kv_indptr.tolist() == [0, *np.cumsum([self.pages_for(self.model[r]) for r in ids]).tolist()]
        for b, rid in enumerate(ids):
            pages = table.kv_indices[table.kv_indptr[b] : table.kv_indptr[b + 1]].tolist()
            assert pages == self.pool.pages(rid)
            tokens = self.model[rid]
            last = int(table.kv_last_page_len[b])
            if tokens:
                assert 1 <= last <= self.page_size and (len(pages) - 1) * self.page_size + last == tokens
            else:
                assert last == 0 and not pages


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(deadline=None, max_examples=60, stateful_step_count=40)


@settings(deadline=None, max_examples=40)
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=6))
def test_freed_pages_are_reused(lengths):
    """Fill the pool to its last page, free one request: exactly its pages come back and a new
    request of the same size gets them."""
    pool = make_pool(page_size=4, max_num_pages=sum(-(-n // 4) for n in lengths))
    for rid, n in enumerate(lengths):
        pool.allocate(rid, n)
    assert pool.num_free_pages == 0
    with pytest.raises(PoolExhaustedError):
        pool.allocate("late", 1)
    victim = len(lengths) // 2
    freed = set(pool.pages(victim))
    pool.free(victim)
    pool.allocate("late", lengths[victim])
    assert set(pool.pages("late")) == freed
    assert pool.num_free_pages == 0


def test_exhaustion_error_is_typed_and_names_the_bound():
    pool = make_pool(page_size=4, max_num_pages=3)
    pool.allocate("a", 9)  # 3 pages
    before = snapshot(pool)
    with pytest.raises(PoolExhaustedError, match=r"needs 1 more pages .* 0 of max_num_pages=3 are free") as info:
        pool.allocate("a", 4)
    assert isinstance(info.value, PlanError) and isinstance(info.value, tilegraph.TilegraphError)
    assert snapshot(pool) == before
    pool.allocate("a", 3)  # fills the last page's free slots without a new page
    assert pool.kv_len("a") == 12


def test_step_is_all_or_nothing():
    pool = make_pool(page_size=2, max_num_pages=4)
    pool.allocate("a", 3)  # 2 pages
    before = snapshot(pool)
    with pytest.raises(PoolExhaustedError, match="needs 3 more pages .* 2 of max_num_pages=4"):
        pool.allocate_step(["b", "a"], [4, 2])  # b would fit alone, with a's extra page it does not
    assert snapshot(pool) == before


def test_bad_arguments():
    pool = make_pool()
    pool.allocate(1, 5)
    with pytest.raises(InputError, match="num_tokens must be a non-negative integer, got -1"):
        pool.allocate(1, -1)
    with pytest.raises(InputError, match="num_tokens must be a non-negative integer, got 2.0"):
        pool.allocate(2, 2.0)
    with pytest.raises(InputError, match="request id 1 appears twice"):
        pool.page_table([1, 1])
    with pytest.raises(InputError, match="request id 1 appears twice"):
        pool.allocate_step([1, 1])
    with pytest.raises(InputError, match="num_tokens has 1 entries for 2 request ids"):
        pool.allocate_step([1, 2], [3])
    with pytest.raises(InputError, match="pad_to=1 is smaller than the step's 2 new tokens"):
        pool.allocate_step([1, 2], 1, pad_to=1)
    with pytest.raises(UnknownRequestError, match="request 2"):
        pool.page_table([1, 2])
    with pytest.raises(StateError, match="never allocated, or already freed"):
        pool.free(2)
    assert snapshot(pool) == (14, ((1, 5, (0, 1)),))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: p.allocate(["x"], 1), "not hashable"),
        (lambda p: p.allocate({"a": 1}, 1), "not hashable"),
        (lambda p: p.free([1]), "not hashable"),
        (lambda p: p.kv_len([1]), "not hashable"),
        (lambda p: p.pages({1}), "not hashable"),
        (lambda p: [1] in p, "not hashable"),
        (lambda p: p.pages_needed([1], 2), "not hashable"),
        (lambda p: p.allocate_step([[1], 2], 1), "not hashable"),
        (lambda p: p.allocate_step("ab", 1), "request_ids must be a sequence"),
        (lambda p: p.allocate_step(5, 1), "request_ids must be a sequence"),
        (lambda p: p.allocate_step([1, 2], 1.5), "num_tokens must be an integer or a sequence"),
        (lambda p: p.allocate_step([1, 2], [1, "2"]), "num_tokens must be a non-negative integer"),
        (lambda p: p.allocate_step([1], [-1]), "num_tokens must be a non-negative integer"),
        (lambda p: p.allocate_step([1], 1, pad_to=2.5), "pad_to must be a non-negative integer"),
        (lambda p: p.allocate(1, 2.0), "num_tokens must be a non-negative integer"),
        (lambda p: p.allocate(1, True), "num_tokens must be a non-negative integer"),
        (lambda p: p.page_table([[1]]), "not hashable"),
        (lambda p: p.page_table(7), "request_ids must be a sequence"),
    ],
)
def test_malformed_arguments_are_input_errors_and_change_nothing(call, match):
    pool = make_pool()
    pool.allocate(1, 5)
    before = snapshot(pool)
    with pytest.raises(InputError, match=match):
        call(pool)
    assert snapshot(pool) == before


def test_settings_must_be_settings():
    with pytest.raises(InputError, match="settings must be a tilegraph.Settings"):
        PagePool({"page_size": 4})


def test_numpy_integer_ids_are_plain_ids():
    pool = make_pool()
    pool.allocate_step(np.array([3, 4]), 2)
    assert pool.kv_len(3) == 2 and pool.page_table([np.int64(4)]).kv_last_page_len.tolist() == [2]
