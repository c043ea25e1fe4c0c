"""Fixed capacities and the int32 plan-buffer layout: pure functions of (Settings, num_ctas).

One plan is one flat int32 buffer (so it reaches the device in ONE copy). Its sections, in order:

    header            [HEADER_WORDS]      num_tiles, num_merges, batch_size, num_slots, plan_serial, 0,
                                          num_pages (page-id guard bound), page_error (0; the kernels set
                                          1 + a request whose page id is outside [0, num_pages))
    cta_tile_indptr   [num_ctas + 1]      CTA c runs tiles cta_tile_indptr[c] : cta_tile_indptr[c+1]
    tile_request      [tile_capacity]     tiles are stored grouped by CTA, in the order each CTA runs them
    tile_kv_head      [tile_capacity]
    tile_token_start  [tile_capacity]     token range [start, end) of the request's KV (end may equal start:
    tile_token_end    [tile_capacity]     a request with kv_len 0 still gets one tile, which writes zeros / -inf)
                                          (tile_request, tile_kv_head and tile_token_end are followed by
                                          VECTOR_SLACK_WORDS unused words: the planner's 16-byte stores)
    tile_slot         [tile_capacity]     -1: the tile writes the final output; s >= 0: partial slot s
                                          (which CTA runs a tile follows from the indptr: ``Plan.cta``)
    merge_slot_indptr [merge_capacity+1]  merge m combines partial slots merge_slot_indptr[m] : [m+1], in order
    merge_request     [merge_capacity]
    merge_kv_head     [merge_capacity]
    kv_indptr         [max_batch_size+1]  the page table, copied in (kernels read it from here)
    kv_indices        [max_page_refs]
    kv_len            [max_batch_size]    tokens per request (derived from the page table)

Partial slots hold one split tile's result for its GQA group: ``partial_out[slot_capacity, group, head_dim]``
float32 and ``partial_lse[slot_capacity, group]`` float32 (natural log) -- sized by query heads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

from tilegraph.settings import Settings

HEADER_WORDS = 8
H_NUM_TILES, H_NUM_MERGES, H_BATCH_SIZE, H_NUM_SLOTS, H_PLAN_SERIAL = 0, 1, 2, 3, 4
#: header words of the device page-id guard (kernels/page_table.py): the pool bound the kernels check
#: every page id against, and the error word they set (1 + request) when one is outside it
H_NUM_PAGES, H_PAGE_ERROR = 6, 7

#: unused words after the decode tile sections the planner writes with 16-byte stores (DecodeLayout.section_slack)
VECTOR_SLACK_WORDS = 3

#: chunk length (tokens) of ``deterministic=True`` plans: a request is split by its own length only
DETERMINISTIC_CHUNK_TOKENS = 512

#: the decode plan buffer's sections, in layout order (the planner's section indices come from here)
DECODE_SECTIONS = (
    "header",
    "cta_tile_indptr",
    "tile_request",
    "tile_kv_head",
    "tile_token_start",
    "tile_token_end",
    "tile_slot",
    "merge_slot_indptr",
    "merge_request",
    "merge_kv_head",
    "kv_indptr",
    "kv_indices",
    "kv_len",
)
_SECTIONS = DECODE_SECTIONS  # former private name


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class SectionedLayout:
    """What every plan layout shares, given ``section_sizes()``, ``slot_capacity``, ``group_size`` and
    ``head_dim``: 16-byte-aligned section offsets, the plan's word count and the workspace bytes."""

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Section name -> (start, stop) in words; every section starts 16-byte aligned, after the
        slack words (``section_slack()``) that follow the section before it."""
        out, pos = {}, 0
        slack = self.section_slack()
        for name, size in self.section_sizes().items():
            out[name] = (pos, pos + size)
            pos = _ceil_div(pos + size + slack.get(name, 0), 4) * 4
        return out

    def section_slack(self) -> dict[str, int]:
        """Words left unused after a section (none by default)."""
        return {}

    @property
    def plan_words(self) -> int:
        return max(stop for _, stop in self.offsets().values()) + 3 & ~3

    def partial_out_shape(self) -> tuple[int, int, int]:
        return (self.slot_capacity, self.group_size, self.head_dim)

    def partial_lse_shape(self) -> tuple[int, int]:
        return (self.slot_capacity, self.group_size)

    @property
    def workspace_nbytes(self) -> int:
        """Device bytes: plan buffer + fp32 partial outputs + fp32 partial LSEs."""
        slots_rows = self.slot_capacity * self.group_size
        return 4 * self.plan_words + 4 * slots_rows * self.head_dim + 4 * slots_rows


@dataclass(frozen=True)
class DecodeLayout(SectionedLayout):
    """Capacities and section offsets (in int32 words) of a decode plan buffer."""

    num_ctas: int
    max_batch_size: int
    max_page_refs: int
    page_size: int
    num_kv_heads: int
    group_size: int
    head_dim: int
    deterministic: bool

    def __hash__(self) -> int:  # every plan looks its layout up (the planner's per-layout inputs): hash once
        return self._hash

    @cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, field.name) for field in fields(self)))

    @classmethod
    def from_settings(cls, settings: Settings, num_ctas: int) -> "DecodeLayout":
        return cls(
            num_ctas=num_ctas,
            max_batch_size=settings.max_batch_size,
            max_page_refs=settings.max_page_refs,
            page_size=settings.page_size,
            num_kv_heads=settings.num_kv_heads,
            group_size=settings.group_size,
            head_dim=settings.head_dim,
            deterministic=settings.deterministic,
        )

    @property
    def max_tokens(self) -> int:
        """Most KV tokens one batch can reference."""
        return self.max_page_refs * self.page_size

    @property
    def tile_capacity(self) -> int:
        """Upper bound on tiles. Balanced plans: chunks >= kv_heads * total_tokens / num_ctas give at most
        one extra tile per CTA beyond one per (request, kv_head). Deterministic plans: fixed chunks."""
        per_request = self.num_kv_heads * self.max_batch_size
        if self.deterministic:
            extra = self.num_kv_heads * _ceil_div(self.max_tokens, DETERMINISTIC_CHUNK_TOKENS)
        else:
            extra = self.num_ctas
        return per_request + extra

    @property
    def slot_capacity(self) -> int:
        """Partial slots: every split tile has one; at most every tile is split."""
        return self.tile_capacity

    @property
    def merge_capacity(self) -> int:
        """Merge entries: one per split (request, kv_head); each covers >= 2 slots."""
        return min(self.num_kv_heads * self.max_batch_size, self.slot_capacity // 2)

    def section_slack(self) -> dict[str, int]:
        """The planner writes a whole pair's request, kv_head and end words four tiles a 16-byte
        store (planner/decode.py), up to VECTOR_SLACK_WORDS past the live tiles: room for them."""
        return dict.fromkeys(("tile_request", "tile_kv_head", "tile_token_end"), VECTOR_SLACK_WORDS)

    def section_sizes(self) -> dict[str, int]:
        t, m, b = self.tile_capacity, self.merge_capacity, self.max_batch_size
        sizes = dict.fromkeys(DECODE_SECTIONS, t)
        sizes.update(
            header=HEADER_WORDS,
            cta_tile_indptr=self.num_ctas + 1,
            merge_slot_indptr=m + 1,
            merge_request=m,
            merge_kv_head=m,
            kv_indptr=b + 1,
            kv_indices=self.max_page_refs,
            kv_len=b,
        )
        return sizes
