"""Decode batches planned as one-token prefill requests: the plans of BatchDecode's tensor-core engine.

A decode step is a prefill batch whose requests each have one query token (qo_indptr = 0, 1, ..., B):
the tensor-core prefill kernel then packs a request's GQA group into the rows of one mma tile and
streams its KV, split and merged as prefill's planner decides. Inputs and errors are decode's
(kv_indptr / kv_indices / kv_last_page_len, or seq_lens); the plan is a PrefillPlan.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from tilegraph.settings import Settings

from .decode import check_csr_batch
from .prefill import PrefillPlan, plan_prefill, plan_prefill_block_table, plan_prefill_device
from .prefill_layout import ROWS_PER_TILE, PrefillLayout
from .validation import index_input, index_length


def decode_prefill_layout(settings: Settings, num_ctas: int) -> PrefillLayout:
    """The prefill layout of decode plans: 16-row tiles (one token x the group's heads; groups past 16
    take one tile of several passes), query tokens bounded by max_batch_size (one per request)."""
    layout = PrefillLayout.from_settings(settings, num_ctas, paged=True, tile_rows=ROWS_PER_TILE)
    return replace(layout, max_num_tokens=settings.max_batch_size)


def one_token_indptr(batch: int) -> np.ndarray:
    """qo_indptr of ``batch`` one-token requests: 0, 1, ..., batch."""
    return np.arange(batch + 1, dtype=np.int32)


def plan_decode_prefill(layout: PrefillLayout, kv_indptr: Any, kv_indices: Any, kv_last_page_len: Any, num_pages: int,
                        serial: int, allow_split: bool) -> PrefillPlan:  # fmt: skip
    """planner.decode.plan_decode's contract (host page ids), planned as one-token prefill requests."""
    batch = _csr_batch(layout, kv_indptr, kv_last_page_len, num_pages)
    return plan_prefill(layout, one_token_indptr(batch), kv_indptr, kv_indices, kv_last_page_len, num_pages=num_pages,
                        causal=False, serial=serial, allow_split=allow_split)  # fmt: skip


def plan_decode_prefill_device(layout: PrefillLayout, kv_indptr: Any, kv_last_page_len: Any, num_indices: int,
                               num_pages: int, serial: int, allow_split: bool) -> PrefillPlan:  # fmt: skip
    """planner.decode.plan_decode_device's contract (page ids stay on the device)."""
    batch = _csr_batch(layout, kv_indptr, kv_last_page_len, num_pages)
    return plan_prefill_device(layout, one_token_indptr(batch), kv_indptr, kv_last_page_len, num_indices,
                               num_pages=num_pages, causal=False, serial=serial, allow_split=allow_split)  # fmt: skip


def plan_decode_prefill_block_table(layout: PrefillLayout, seq_lens: Any, row_stride: int, max_blocks: int, span: int,
                                    num_pages: int, serial: int, allow_split: bool) -> PrefillPlan:  # fmt: skip
    """planner.decode.plan_decode_block_table's contract (a device block table, host seq_lens)."""
    batch = index_length(index_input(seq_lens, "seq_lens"))
    return plan_prefill_block_table(layout, one_token_indptr(batch), seq_lens, row_stride, max_blocks, span,
                                    num_pages=num_pages, causal=False, serial=serial, allow_split=allow_split)  # fmt: skip


def _csr_batch(layout: PrefillLayout, kv_indptr: Any, kv_last_page_len: Any, num_pages: int) -> int:
    """B, with decode's messages for a malformed kv_indptr / kv_last_page_len (B from the latter);
    the prefill planner then takes the caller's arrays as they are."""
    last = index_input(kv_last_page_len, "kv_last_page_len")
    check_csr_batch(layout, index_input(kv_indptr, "kv_indptr"), index_length(last), num_pages)
    return index_length(last)


__all__ = ["decode_prefill_layout", "one_token_indptr", "plan_decode_prefill", "plan_decode_prefill_device",
           "plan_decode_prefill_block_table"]  # fmt: skip
