"""Planning for device-resident page tables: from host lengths only, the same schedule as the host path
(plan_decode / plan_prefill on the same batch), page bases per request (CSR offsets or r * row_stride),
the guard's pool bound in the header, the live ranges staged, and every length error typed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tilegraph
from tilegraph import InputError, PlanError
from tilegraph.planner.decode import plan_decode, plan_decode_block_table, plan_decode_device
from tilegraph.planner.layout import H_NUM_PAGES, H_PAGE_ERROR, DecodeLayout
from tilegraph.planner.decode_prefill import plan_decode_prefill, plan_decode_prefill_block_table
from tilegraph.planner.prefill import plan_prefill, plan_prefill_block_table, plan_prefill_device, plan_prefill_ragged
from tilegraph.planner.prefill_layout import PrefillLayout

PS, POOL = 4, 4096
SETTINGS = tilegraph.Settings(num_qo_heads=8, num_kv_heads=2, head_dim=16, page_size=PS, max_batch_size=16,
                              max_num_pages=POOL, max_num_tokens=128)  # fmt: skip
TILE_FIELDS = ("tile_request", "tile_kv_head", "tile_token_start", "tile_token_end", "tile_slot")


def csr(kv_lens, rng):
    counts = [-(-n // PS) for n in kv_lens]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = rng.permutation(POOL)[: indptr[-1]].astype(np.int32)
    last = np.array([(n - 1) % PS + 1 if n else 0 for n in kv_lens], np.int32)
    return indptr, indices, last


def live(plan, names, count):
    return [plan.section(n)[:count].tolist() for n in names]


@given(kv_lens=st.lists(st.integers(0, 300), min_size=0, max_size=16), num_ctas=st.sampled_from([1, 3, 8]),
       deterministic=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_decode_device_plans_schedule_as_the_host_plan(kv_lens, num_ctas, deterministic, seed):
    rng = np.random.default_rng(seed)
    layout = DecodeLayout.from_settings(SETTINGS.model_copy(update={"deterministic": deterministic}), num_ctas)
    indptr, indices, last = csr(kv_lens, rng)
    host = plan_decode(layout, indptr, indices, last, num_pages=POOL, serial=3)
    device = plan_decode_device(layout, indptr, last, num_indices=len(indices), num_pages=POOL, serial=3)
    row_stride = 80
    blocks = plan_decode_block_table(layout, np.array(kv_lens, np.int32), row_stride, 76, row_stride * 16, POOL, serial=3)
    b = len(kv_lens)
    for plan in (device, blocks):
        assert plan.num_tiles == host.num_tiles and plan.num_merges == host.num_merges
        assert live(plan, TILE_FIELDS, host.num_tiles) == live(host, TILE_FIELDS, host.num_tiles)
        assert plan.kv_len[:b].tolist() == list(kv_lens)
        assert plan.max_page_index == -1  # no page id was read on the host
        assert plan.section("header").tolist() == host.section("header").tolist()
    assert host.section("header")[H_NUM_PAGES] == POOL and host.section("header")[H_PAGE_ERROR] == 0
    assert (host.page_table, device.page_table, blocks.page_table) == ("host", "device", "block_table")
    assert device.section("kv_indptr")[: b + 1].tolist() == indptr.tolist()
    bases = [r * row_stride if n else 0 for r, n in enumerate(kv_lens)]
    assert blocks.section("kv_indptr")[:b].tolist() == bases


def test_live_ranges_cover_what_the_kernels_read_and_skip_a_device_table():
    rng = np.random.default_rng()
    layout = DecodeLayout.from_settings(SETTINGS.model_copy(update={"max_page_refs": POOL}), 4)
    indptr, indices, last = csr([37, 5, 120], rng)
    offsets = layout.offsets()
    host = plan_decode(layout, indptr, indices, last, num_pages=POOL)
    device = plan_decode_device(layout, indptr, last, num_indices=len(indices), num_pages=POOL)

    def covered(plan):
        mask = np.zeros(layout.plan_words, bool)
        for start, stop in plan.live_ranges():
            mask[start:stop] = True
        return mask

    start = offsets["kv_indices"][0]
    assert covered(host)[start : start + len(indices)].all()
    assert not covered(device)[start + 1024 : offsets["kv_indices"][1]].any()  # the big section is not staged
    for plan in (host, device):
        mask = covered(plan)
        for name in ("header", "cta_tile_indptr"):
            assert mask[slice(*offsets[name])].all()
        assert mask[offsets["tile_request"][0] : offsets["tile_request"][0] + plan.num_tiles].all()
        assert mask[offsets["kv_len"][0] : offsets["kv_len"][0] + 3].all()


def offset_view(a: np.ndarray) -> torch.Tensor:
    """A contiguous int32 tensor at a storage offset: the entries after 3 poison ones."""
    return torch.from_numpy(np.concatenate([np.full(3, -5, np.int32), a]))[3:]


def strided_view(a: np.ndarray) -> torch.Tensor:
    """A non-contiguous int32 tensor: every other entry of an interleaved one."""
    return torch.from_numpy(np.stack([a, np.full_like(a, -5)], axis=1).reshape(-1))[::2]


def same_live_words(got, expected, num_page_ids: int) -> bool:
    """Two prefill plans agree on every word the kernels read: header, CTA index, tiles, merges, the
    copied query offsets, KV offsets and lengths, and ``num_page_ids`` copied page ids."""
    batch = expected.batch_size
    live = {"header": None, "cta_tile_indptr": None, "qo_indptr": batch + 1, "kv_indptr": batch + 1, "kv_len": batch,
            "kv_indices": num_page_ids}  # fmt: skip
    words = [got.section(name)[:count].tolist() == expected.section(name)[:count].tolist() for name, count in live.items()]
    tiles = [got.tiles()[name].tolist() == values.tolist() for name, values in expected.tiles().items()]
    return got.num_tiles == expected.num_tiles and got.num_merges == expected.num_merges and all(words + tiles)


@pytest.mark.parametrize("view", [offset_view, strided_view])
def test_prefill_and_decode_prefill_plans_read_torch_views_as_numpy(view):
    """The prefill planners take contiguous int32 CPU tensors as (address, length) (index_input), as
    decode's do: on every paged and the ragged path, a tensor at a storage offset and a strided one
    plan as their numpy arrays. Fails if the address ignores the offset or a strided view is read
    as contiguous (the poison entries become lengths or page ids)."""
    rng = np.random.default_rng()
    kv_lens, qo_lens = [30, 9, 0, 64], [4, 9, 3, 1]
    layout = PrefillLayout.from_settings(SETTINGS, 3, paged=True)
    indptr, indices, last = csr(kv_lens, rng)
    qo = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    seq_lens = np.array(kv_lens, np.int32)
    plans = [
        lambda qo, indptr, indices, last, seq_lens: plan_prefill(layout, qo, indptr, indices, last, num_pages=POOL, causal=True),
        lambda qo, indptr, indices, last, seq_lens: plan_prefill_device(layout, qo, indptr, last, 300, num_pages=POOL, causal=True),
        lambda qo, indptr, indices, last, seq_lens: plan_prefill_block_table(layout, qo, seq_lens, 20, 20, 80, num_pages=POOL,
                                                                            causal=True),  # fmt: skip
        lambda qo, indptr, indices, last, seq_lens: plan_decode_prefill(layout, indptr, indices, last, POOL, 0, True),
        lambda qo, indptr, indices, last, seq_lens: plan_decode_prefill_block_table(layout, seq_lens, 20, 20, 80, POOL, 0, True),
    ]
    arrays = (qo, indptr, indices, last, seq_lens)
    tensors = [view(a) for a in arrays]
    assert tensors[0].is_contiguous() == (view is offset_view)
    for plan in plans:
        expected, got = plan(*arrays), plan(*tensors)
        assert same_live_words(got, expected, len(indices) if expected.page_table == "host" else 0)
    ragged = PrefillLayout.from_settings(SETTINGS, 3, paged=False)
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    expected = plan_prefill_ragged(ragged, qo, kv_indptr, causal=True)
    got = plan_prefill_ragged(ragged, view(qo), view(kv_indptr), causal=True)
    assert same_live_words(got, expected, 0)


def test_prefill_device_plans_schedule_as_the_host_plan():
    rng = np.random.default_rng()
    kv_lens, qo_lens = [30, 9, 0, 64], [4, 9, 3, 1]
    layout = PrefillLayout.from_settings(SETTINGS, 3, paged=True)
    indptr, indices, last = csr(kv_lens, rng)
    qo = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    host = plan_prefill(layout, qo, indptr, indices, last, num_pages=POOL, causal=True)
    device = plan_prefill_device(layout, qo, indptr, last, len(indices), num_pages=POOL, causal=True)
    blocks = plan_prefill_block_table(layout, qo, np.array(kv_lens, np.int32), 20, 20, 80, num_pages=POOL, causal=True)
    for plan in (device, blocks):
        assert plan.num_tiles == host.num_tiles
        for name, values in host.tiles().items():
            assert plan.tiles()[name].tolist() == values.tolist(), name
        assert plan.section("header").tolist() == host.section("header").tolist()
    assert host.section("header")[H_NUM_PAGES] == POOL
    assert blocks.section("kv_indptr")[:4].tolist() == [0, 20, 0, 60]
    offsets = layout.offsets()
    for plan, pages in ((host, len(indices)), (device, 0)):
        mask = np.zeros(layout.plan_words, bool)
        for start, stop in plan.live_ranges():
            mask[start:stop] = True
        for name, count in (("header", 8), ("qo_indptr", 5), ("kv_indptr", 5), ("kv_len", 4), ("kv_indices", pages),
                            ("tile_kv_end", plan.num_tiles), ("merge_slot_indptr", plan.num_merges + 1)):  # fmt: skip
            assert mask[offsets[name][0] : offsets[name][0] + count].all(), name


def test_length_errors_are_typed_and_named():
    layout = DecodeLayout.from_settings(SETTINGS.model_copy(update={"max_page_refs": 8}), 2)
    with pytest.raises(InputError, match=r"kv_indptr\[-1\]=3 exceeds len\(kv_indices\)"):
        plan_decode_device(layout, np.array([0, 3], np.int32), np.array([1], np.int32), 2, POOL)
    with pytest.raises(InputError, match=r"kv_last_page_len\[0\]=9"):
        plan_decode_device(layout, np.array([0, 3], np.int32), np.array([9], np.int32), 3, POOL)
    with pytest.raises(PlanError, match="exceed max_page_refs=8"):
        plan_decode_device(layout, np.array([0, 9], np.int32), np.array([1], np.int32), 9, POOL)
    with pytest.raises(InputError, match="kv_indptr must have"):
        plan_decode_device(layout, np.array([0], np.int32), np.array([1], np.int32), 9, POOL)
    with pytest.raises(InputError, match=r"seq_lens\[1\]=-2"):
        plan_decode_block_table(layout, np.array([3, -2], np.int32), 4, 4, 8, POOL)
    with pytest.raises(PlanError, match="request 0 needs 2 pages"):
        plan_decode_block_table(layout, np.array([5], np.int32), 1, 1, 1, POOL)
    with pytest.raises(InputError, match="block_table row 1"):
        plan_decode_block_table(layout, np.array([4, 4], np.int32), 4, 4, 4, POOL)
    with pytest.raises(PlanError, match="exceed max_page_refs=8"):
        plan_decode_block_table(layout, np.array([16, 16, 4], np.int32), 8, 8, 24, POOL)
    with pytest.raises(InputError, match="seq_lens must be int32"):
        plan_decode_block_table(layout, np.array([3], np.int64), 4, 4, 4, POOL)
    pre = PrefillLayout.from_settings(SETTINGS, 2, paged=True)
    with pytest.raises(InputError, match="seq_lens must have len"):
        plan_prefill_block_table(pre, np.array([0, 1], np.int32), np.array([3, 3], np.int32), 4, 4, 8, POOL, causal=True)


def test_a_kv_len_past_int32_is_a_plan_error():
    """Token positions are int32: 32769 pages of 65536 tokens (the last holding 7) is 2**31 + 7."""
    layout = DecodeLayout(num_ctas=4, max_batch_size=2, max_page_refs=40000, page_size=1 << 16, num_kv_heads=1,
                          group_size=1, head_dim=16, deterministic=False)  # fmt: skip
    with pytest.raises(PlanError, match=r"request 1 has kv_len 2147483655 > 2147483647"):
        plan_decode_device(layout, np.array([0, 1, 32770], np.int32), np.array([5, 7], np.int32), 40000, POOL)


def expected_block_error(seq_lens, row_stride, max_blocks, span, page_size, max_page_refs):
    """The error a block table's lengths must raise, stated plainly (None: they are valid)."""
    pages = [-(-n // page_size) for n in seq_lens]
    for i, (tokens, count) in enumerate(zip(seq_lens, pages)):
        if tokens < 0:
            return InputError, rf"seq_lens\[{i}\]={tokens} must be"
        if count > max_blocks:
            return PlanError, f"request {i} needs {count} pages"
        if count > 0 and i * row_stride + count > span:
            return InputError, f"block_table row {i} "
    if sum(pages) > max_page_refs:
        return PlanError, rf"kv_indptr\[-1\]={sum(pages)} page references exceed"
    return None


@given(seq_lens=st.lists(st.integers(-3, 40), min_size=1, max_size=12), page_size=st.sampled_from([4, 6, 16]),
       max_blocks=st.integers(1, 8), extra_rows=st.integers(-2, 2), max_page_refs=st.integers(4, 40))  # fmt: skip
def test_block_lengths_are_checked_as_stated(seq_lens, page_size, max_blocks, extra_rows, max_page_refs):
    """The branch-free check (a shift for power-of-two page sizes, a float division for others) finds
    the first bad request, or the page references over the bound, and writes kv_len and row bases."""
    settings = SETTINGS.model_copy(update={"page_size": page_size, "max_page_refs": max_page_refs})
    layout = DecodeLayout.from_settings(settings, 3)
    span = (len(seq_lens) + extra_rows) * max_blocks
    lengths = np.array(seq_lens, np.int32)
    expected = expected_block_error(seq_lens, max_blocks, max_blocks, span, page_size, max_page_refs)
    if expected is not None:
        error, message = expected
        with pytest.raises(error, match=message):
            plan_decode_block_table(layout, lengths, max_blocks, max_blocks, span, POOL)
        return
    plan = plan_decode_block_table(layout, lengths, max_blocks, max_blocks, span, POOL)
    assert plan.section("kv_len")[: len(seq_lens)].tolist() == seq_lens
    bases = [i * max_blocks if n > 0 else 0 for i, n in enumerate(seq_lens)]
    assert plan.section("kv_indptr")[: len(seq_lens)].tolist() == bases
