"""plan_decode rejects every malformed page table with a typed error naming the argument and the bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilegraph.errors import InputError, PlanError
from tilegraph.planner.decode import plan_decode
from tilegraph.planner.layout import DecodeLayout

LAYOUT = DecodeLayout(num_ctas=8, max_batch_size=4, max_page_refs=12, page_size=16, num_kv_heads=2,
                      group_size=2, head_dim=64, deterministic=False)  # fmt: skip
NUM_PAGES = 32


def good() -> dict[str, np.ndarray]:
    return {
        "kv_indptr": np.array([0, 3, 3, 5], np.int32),
        "kv_indices": np.array([4, 0, 31, 7, 9, 1], np.int32),
        "kv_last_page_len": np.array([16, 0, 1], np.int32),  # request 1 has no pages: its value is ignored
    }


def plan(table: dict[str, object], layout: DecodeLayout = LAYOUT, num_pages: int = NUM_PAGES):
    return plan_decode(layout, table["kv_indptr"], table["kv_indices"], table["kv_last_page_len"], num_pages=num_pages)


def test_the_good_table_plans():
    assert plan(good()).kv_len[:3].tolist() == [48, 0, 17]


BAD_INPUTS = [
    ("kv_indptr", lambda a: a.astype(np.int64), InputError, "kv_indptr must be int32"),
    ("kv_indices", lambda a: a.astype(np.float32), InputError, "kv_indices must be int32"),
    ("kv_last_page_len", lambda a: a.astype(np.uint32), InputError, "kv_last_page_len must be int32"),
    ("kv_indptr", lambda a: a.reshape(1, -1), InputError, "kv_indptr must be 1-D"),
    ("kv_indices", lambda a: a.tolist(), InputError, "kv_indices must be an int32 CPU"),
    ("kv_last_page_len", lambda a: torch.from_numpy(a).long(), InputError, "kv_last_page_len must be int32"),
    ("kv_indptr", lambda a: torch.from_numpy(a).to("meta"), InputError, "kv_indptr must be on the CPU"),
    ("kv_indptr", lambda a: a[:-1], InputError, "kv_indptr must have len(kv_last_page_len) + 1 = 4"),
    ("kv_indptr", lambda a: a + 1, InputError, "kv_indptr[0] must be 0"),
    ("kv_indptr", lambda a: np.array([0, 3, 2, 5], np.int32), InputError, "kv_indptr[2] < kv_indptr[1]"),
    ("kv_indptr", lambda a: np.array([0, 3, 3, 7], np.int32), InputError, "kv_indptr[-1]=7 exceeds len(kv_indices)"),
    ("kv_indices", lambda a: np.where(a == 9, 32, a).astype(np.int32), InputError, "kv_indices[4]=32 is outside [0, num_pages=32)"),
    ("kv_indices", lambda a: np.where(a == 0, -1, a).astype(np.int32), InputError, "kv_indices[1]=-1 is outside [0, num_pages=32)"),
    ("kv_last_page_len", lambda a: np.array([0, 0, 1], np.int32), InputError, "kv_last_page_len[0]=0 is outside [1, page_size=16]"),
    ("kv_last_page_len", lambda a: np.array([16, 0, 17], np.int32), InputError, "kv_last_page_len[2]=17 is outside [1, page_size=16]"),
]


@pytest.mark.parametrize("name, corrupt, error, message", BAD_INPUTS)
def test_bad_input_raises_a_typed_error_naming_it(name, corrupt, error, message):
    table = good()
    table[name] = corrupt(table[name])
    with pytest.raises(error) as info:
        plan(table)
    assert message in str(info.value)
    assert name in str(info.value)


def test_page_indices_past_the_referenced_ones_are_not_checked():
    table = good()
    table["kv_indices"] = np.append(table["kv_indices"], np.int32(10**6))
    assert plan(table).max_page_index == 31


def test_batch_beyond_max_batch_size_is_a_plan_error():
    with pytest.raises(PlanError, match="batch size 5 exceeds max_batch_size=4"):
        plan({"kv_indptr": np.zeros(6, np.int32), "kv_indices": np.zeros(0, np.int32), "kv_last_page_len": np.ones(5, np.int32)})


def test_page_references_beyond_capacity_are_a_plan_error():
    table = {"kv_indptr": np.array([0, 13], np.int32), "kv_indices": np.zeros(13, np.int32), "kv_last_page_len": np.ones(1, np.int32)}
    with pytest.raises(PlanError, match=r"kv_indptr\[-1\]=13 page references exceed max_page_refs=12"):
        plan(table)


@settings(deadline=None, max_examples=200)
@given(
    kv_indptr=st.lists(st.integers(-3, 14), min_size=1, max_size=6),
    kv_indices=st.lists(st.integers(-2, 40), max_size=14),
    kv_last_page_len=st.lists(st.integers(-1, 18), max_size=6),
)
def test_arbitrary_tables_plan_or_raise_a_typed_error(kv_indptr, kv_indices, kv_last_page_len):
    table = {"kv_indptr": np.array(kv_indptr, np.int32), "kv_indices": np.array(kv_indices, np.int32),
             "kv_last_page_len": np.array(kv_last_page_len, np.int32)}  # fmt: skip
    try:
        result = plan(table)
    except (InputError, PlanError):
        return
    batch = len(kv_last_page_len)
    assert result.batch_size == batch and kv_indptr[0] == 0 and kv_indptr[-1] <= len(kv_indices)
    assert all(0 <= p < NUM_PAGES for p in kv_indices[: kv_indptr[-1]])
