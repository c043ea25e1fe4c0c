"""Fixed capacities and the int32 plan-buffer layout of batch prefill: pure functions of (Settings, num_ctas).

A prefill *tile* is (request, query tile, kv_head, kv chunk): up to ``q_tile`` query tokens of one
request against a token range of its KV, for every query head of the kv_head's GQA group (the
kernel packs tokens x group heads into its query rows). One plan is one flat int32 buffer:

    header            [HEADER_WORDS]      num_tiles, num_merges, batch_size, num_slots, plan_serial, num_tokens, 0, 0
    cta_tile_indptr   [num_ctas + 1]      CTA c runs tiles cta_tile_indptr[c] : cta_tile_indptr[c+1]
    tile_request      [tile_capacity]
    tile_q_start      [tile_capacity]     query tokens [q_start, q_end) of the request (request-local)
    tile_q_end        [tile_capacity]
    tile_kv_head      [tile_capacity]
    tile_kv_start     [tile_capacity]     KV tokens [kv_start, kv_end) (kv_start == kv_end: zeros / -inf)
    tile_kv_end       [tile_capacity]
    tile_slot         [tile_capacity]     -1: final output; s >= 0: query token i of the tile writes slot
    tile_slot_stride  [tile_capacity]       s + i * stride (stride = the number of chunks of the split)
    tile_cta          [tile_capacity]     the CTA that runs the tile (inspection)
    merge_slot_indptr [merge_capacity+1]  merge m combines slots merge_slot_indptr[m] : [m+1], in KV order
    merge_request     [merge_capacity]    the query token (global row of q/out) the merge writes
    merge_kv_head     [merge_capacity]
    qo_indptr         [max_batch_size+1]  copied in: query token offsets
    kv_indptr         [max_batch_size+1]  paged: page offsets; ragged: KV token offsets
    kv_indices        [max_page_refs]     paged only (ragged: 4 unused words)
    kv_len            [max_batch_size]    KV tokens per request

Partial slots hold one (query token, kv_head, chunk)'s result for the GQA group:
``partial_out[slot_capacity, group, head_dim]`` and ``partial_lse[slot_capacity, group]`` float32 --
the same shape convention as decode, so the decode partial-merge kernel combines them (its
"request" is the query token). Capacities (proofs in planner/prefill.py):

* query tiles U <= num_kv_heads * (max_num_tokens // q_tile + min(max_batch_size, max_num_tokens));
  splitting adds at most num_ctas tiles;
* split pieces <= 2 * num_ctas - 1, each holding <= q_tile tokens, so slots <= 2 * num_ctas * q_tile;
  also each split has <= num_ctas pieces, so slots <= num_ctas * num_kv_heads * max_num_tokens;
* merges (one per split query token and kv_head) <= min(num_ctas * q_tile, num_kv_heads * max_num_tokens).

So the partial workspace is rows x heads exact: slot_capacity * group_size query-head rows, never
inflated by the group factor a second time.
"""

from __future__ import annotations

from dataclasses import dataclass

from tilegraph.errors import InputError
from tilegraph.settings import Settings

from .layout import HEADER_WORDS, SectionedLayout

#: query rows (tokens x GQA heads) of the smallest tile (one mma m16 fragment, the CUDA-core kernel's pass);
#: a layout's ``tile_rows`` (the launch tuning table's query tile, kernels.tuning.prefill_tile_rows) is
#: a multiple of it
ROWS_PER_TILE = 16
H_NUM_TOKENS = 5  # header word: query tokens of the batch (qo_indptr[-1])

PREFILL_SECTIONS = (
    "header",
    "cta_tile_indptr",
    "tile_request",
    "tile_q_start",
    "tile_q_end",
    "tile_kv_head",
    "tile_kv_start",
    "tile_kv_end",
    "tile_slot",
    "tile_slot_stride",
    "tile_cta",
    "merge_slot_indptr",
    "merge_request",
    "merge_kv_head",
    "qo_indptr",
    "kv_indptr",
    "kv_indices",
    "kv_len",
)
TILE_SECTIONS = tuple(name for name in PREFILL_SECTIONS if name.startswith("tile_"))


def query_tile_tokens(group_size: int, tile_rows: int = ROWS_PER_TILE) -> int:
    """Query tokens per tile: ``tile_rows`` rows of tokens x group heads (at least one token)."""
    return max(1, tile_rows // group_size)


@dataclass(frozen=True)
class PrefillLayout(SectionedLayout):
    """Capacities and section offsets (int32 words) of a prefill plan buffer; ``paged`` False: ragged KV."""

    num_ctas: int
    max_batch_size: int
    max_num_tokens: int
    max_page_refs: int
    page_size: int
    num_kv_heads: int
    group_size: int
    head_dim: int
    paged: bool
    deterministic: bool
    tile_rows: int = ROWS_PER_TILE  # query rows (tokens x heads) of a tile

    def __post_init__(self) -> None:
        if self.tile_rows < ROWS_PER_TILE or self.tile_rows % ROWS_PER_TILE:
            raise InputError(f"tile_rows must be a positive multiple of {ROWS_PER_TILE}, got {self.tile_rows}")

    @classmethod
    def from_settings(cls, settings: Settings, num_ctas: int, paged: bool = True,
                      tile_rows: int = ROWS_PER_TILE) -> "PrefillLayout":  # fmt: skip
        """``tile_rows``: the kernel's query rows per tile (the runtime passes the tuning table's)."""
        return cls(
            num_ctas=num_ctas,
            max_batch_size=settings.max_batch_size,
            max_num_tokens=settings.max_num_tokens,
            max_page_refs=settings.max_page_refs,
            page_size=settings.page_size,
            num_kv_heads=settings.num_kv_heads,
            group_size=settings.group_size,
            head_dim=settings.head_dim,
            paged=paged,
            deterministic=settings.deterministic,
            tile_rows=tile_rows,
        )

    @property
    def q_tile(self) -> int:
        return query_tile_tokens(self.group_size, self.tile_rows)

    @property
    def query_tile_capacity(self) -> int:
        """Unsplit tiles: sum over requests of ceil(qo_len / q_tile), times kv_heads."""
        tiles = self.max_num_tokens // self.q_tile + min(self.max_batch_size, self.max_num_tokens)
        return self.num_kv_heads * tiles

    @property
    def tile_capacity(self) -> int:
        return self.query_tile_capacity + self.num_ctas

    @property
    def slot_capacity(self) -> int:
        return min(2 * self.num_ctas * self.q_tile, self.num_ctas * self.num_kv_heads * self.max_num_tokens)

    @property
    def merge_capacity(self) -> int:
        return min(self.num_ctas * self.q_tile, self.num_kv_heads * self.max_num_tokens)

    def section_sizes(self) -> dict[str, int]:
        b = self.max_batch_size
        sizes = dict.fromkeys(PREFILL_SECTIONS, self.tile_capacity)
        sizes.update(
            header=HEADER_WORDS,
            cta_tile_indptr=self.num_ctas + 1,
            merge_slot_indptr=self.merge_capacity + 1,
            merge_request=self.merge_capacity,
            merge_kv_head=self.merge_capacity,
            qo_indptr=b + 1,
            kv_indptr=b + 1,
            kv_indices=self.max_page_refs if self.paged else 4,
            kv_len=b,
        )
        return sizes
