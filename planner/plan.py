"""``tilegraph.Plan``: one decode schedule in its flat int32 buffer, plus the cost model it was made under.

Cost model (shared by the planner, the anchors and every reported ``balance``): a tile of ``t`` KV
tokens costs ``t + TILE_OVERHEAD_TOKENS`` units; a CTA's load is the sum of its tiles' costs; the
makespan is the largest load. ``ideal = sum over (request, kv_head) of (kv_len + TILE_OVERHEAD_TOKENS)
/ num_ctas`` is a property of the batch alone (every pair needs at least one tile, so no schedule beats
it), and ``balance = ideal / makespan`` is in (0, 1], comparable across schedulers of the same batch.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from .layout import DecodeLayout

#: a tile's fixed work in KV-token units: loading q for its GQA group, writing its output or fp32
#: partial (O, LSE) and its share of the merge -- about two 16-token pages of K/V reads.
TILE_OVERHEAD_TOKENS = 32


def ideal_makespan(kv_len: np.ndarray, num_kv_heads: int, num_ctas: int) -> float:
    """Every (request, kv_head) pair's one-tile cost spread perfectly over the CTAs: no schedule's
    makespan is lower (each pair needs at least one tile; splits only add overhead)."""
    total = num_kv_heads * (int(np.asarray(kv_len, dtype=np.int64).sum()) + TILE_OVERHEAD_TOKENS * len(kv_len))
    return total / num_ctas


def balance_of(ideal: float, makespan: int) -> float:
    """``ideal / makespan``; an empty batch (makespan 0) is perfectly balanced."""
    return ideal / makespan if makespan > 0 else 1.0


#: live ranges of a plan buffer closer than this (int32 words) are staged as one range
STAGE_GAP_WORDS = 1024


def live_ranges(offsets: dict[str, tuple[int, int]], buffer: np.ndarray, num_tiles: int, num_merges: int,
                batch_size: int, host_indices: bool) -> list[tuple[int, int]]:  # fmt: skip
    """The word ranges of a decode or prefill plan ``buffer`` (sections at ``offsets``) the kernels
    read: header and CTA index whole, the tile_* sections' live tiles, the live merges, B + 1
    indptr entries, B kv lengths, the copied page ids (``host_indices``: kv_indptr[B] of them).
    Ranges closer than STAGE_GAP_WORDS are joined."""
    return ranges_of_table(live_table(offsets), offsets["kv_indptr"][0], buffer, num_tiles, num_merges, batch_size,
                           host_indices)  # fmt: skip


#: which count bounds a section's live words (an index into ranges_of_table's ``counts``; tile_*: 1)
_LIVE_KIND = {"header": 0, "cta_tile_indptr": 0, "merge_slot_indptr": 2, "merge_request": 3, "merge_kv_head": 3,
              "qo_indptr": 4, "kv_indptr": 4, "kv_indices": 6, "kv_len": 5}  # fmt: skip


def live_table(offsets: dict[str, tuple[int, int]]) -> tuple[tuple[int, int, int], ...]:
    """(start, stop, which count bounds it) per section: what ``ranges_of_table`` walks (cache it per layout)."""
    return tuple((start, stop, _LIVE_KIND.get(name, 1)) for name, (start, stop) in offsets.items())


def ranges_of_table(table: tuple[tuple[int, int, int], ...], kv_indptr_start: int, buffer: np.ndarray, num_tiles: int,
                    num_merges: int, batch_size: int, host_indices: bool) -> list[tuple[int, int]]:  # fmt: skip
    """``live_ranges`` from a precomputed ``live_table``."""
    b = batch_size
    nnz = int(buffer[kv_indptr_start + b]) if host_indices else 0
    counts = (-1, num_tiles, num_merges + 1, num_merges, b + 1, b, nnz)  # -1: the whole section
    ranges: list[tuple[int, int]] = []
    for start, stop, kind in table:
        count = counts[kind]
        end = stop if count < 0 else min(stop, start + count)
        if ranges and start - ranges[-1][1] <= STAGE_GAP_WORDS:  # a short gap: one copy is cheaper
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


@lru_cache(maxsize=128)
def layout_live_table(layout: Any) -> tuple[tuple[tuple[int, int, int], ...], int]:
    """A decode or prefill layout's ``live_table`` and the start of its kv_indptr section (cached)."""
    offsets = layout.offsets()
    return live_table(offsets), offsets["kv_indptr"][0]


@lru_cache(maxsize=64)
def _offsets(layout: DecodeLayout) -> dict[str, tuple[int, int]]:
    return layout.offsets()


class Plan:
    """A decode plan: ``buffer`` (int32, ``layout.plan_words``, laid out as planner/layout.py says) and
    stats. The per-tile / per-merge / per-request views are read-only and span the full capacity;
    only the first ``num_tiles`` / ``num_merges`` / ``batch_size`` entries are live (the rest is
    undefined and never read by the kernels)."""

    def __init__(
        self,
        layout: DecodeLayout,
        buffer: np.ndarray,
        serial: int,
        batch_size: int,
        num_tiles: int,
        num_merges: int,
        num_slots: int,
        makespan: int,
        ideal: float,
        max_page_index: int,
        page_table: str = "host",
    ) -> None:
        self.layout = layout
        self.buffer = buffer
        self.serial = serial
        self.batch_size = batch_size
        self.num_tiles = num_tiles
        self.num_merges = num_merges
        self.num_slots = num_slots
        self.makespan = makespan  # largest CTA load, in cost units (tokens + overhead per tile)
        self.ideal = ideal  # total unsplit cost / num_ctas
        self.max_page_index = max_page_index  # largest page referenced; -1 when no page is
        # where the kernels read page ids: "host" (copied into the plan), "device" (a caller's CSR
        # kv_indices tensor) or "block_table" (a caller's [B, max_blocks] tensor); the last two are
        # guarded on the device and max_page_index is then -1 (no id was read on the host)
        self.page_table = page_table

    @property
    def num_ctas(self) -> int:
        return self.layout.num_ctas

    @property
    def balance(self) -> float:
        """``ideal / makespan``, in (0, 1] (plan.py's cost model)."""
        return balance_of(self.ideal, self.makespan)

    def section(self, name: str) -> np.ndarray:
        """A read-only view of one buffer section at full capacity (names: layout.section_sizes())."""
        start, stop = _offsets(self.layout)[name]
        view = self.buffer[start:stop]
        view.flags.writeable = False
        return view

    request = cached_property(lambda self: self.section("tile_request"))
    kv_head = cached_property(lambda self: self.section("tile_kv_head"))
    token_start = cached_property(lambda self: self.section("tile_token_start"))
    token_end = cached_property(lambda self: self.section("tile_token_end"))
    slot = cached_property(lambda self: self.section("tile_slot"))
    @cached_property
    def cta(self) -> np.ndarray:
        """The CTA that runs each tile, at full capacity (read-only): derived from ``cta_tile_indptr``,
        which is all the kernels read (the plan buffer does not carry it)."""
        out = np.zeros(self.layout.tile_capacity, dtype=np.int32)
        counts = np.diff(self.cta_tile_indptr.astype(np.int64))
        out[: self.num_tiles] = np.repeat(np.arange(self.num_ctas, dtype=np.int32), counts)
        out.flags.writeable = False
        return out

    cta_tile_indptr = cached_property(lambda self: self.section("cta_tile_indptr"))
    merge_slot_indptr = cached_property(lambda self: self.section("merge_slot_indptr"))
    merge_request = cached_property(lambda self: self.section("merge_request"))
    merge_kv_head = cached_property(lambda self: self.section("merge_kv_head"))
    kv_len = cached_property(lambda self: self.section("kv_len"))

    def live_ranges(self) -> list[tuple[int, int]]:
        """The (start, stop) word ranges of ``buffer`` the kernels read for this plan: the header, the
        CTA index, the live tiles and merges and the live page-table entries (a device page table
        has none here). Staging only these keeps plan() independent of the Settings capacities."""
        table, kv_indptr_start = layout_live_table(self.layout)
        return ranges_of_table(table, kv_indptr_start, self.buffer, self.num_tiles, self.num_merges, self.batch_size,
                               self.page_table == "host")  # fmt: skip

    def tiles_per_cta(self) -> np.ndarray:
        """Number of tiles each CTA runs."""
        return np.diff(self.cta_tile_indptr.astype(np.int64))

    def cta_loads(self) -> np.ndarray:
        """Each CTA's load under the cost model (tokens + TILE_OVERHEAD_TOKENS per tile)."""
        n = self.num_tiles
        cost = self.token_end[:n].astype(np.int64) - self.token_start[:n] + TILE_OVERHEAD_TOKENS
        return np.bincount(self.cta[:n], weights=cost, minlength=self.num_ctas).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"Plan(#{self.serial}: {self.batch_size} requests, {self.num_tiles} tiles, "
            f"{self.num_merges} merges / {self.num_slots} slots on {self.num_ctas} CTAs, "
            f"makespan {self.makespan}, balance {self.balance:.3f})"
        )
