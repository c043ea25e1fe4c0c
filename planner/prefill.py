"""``plan_prefill`` / ``plan_prefill_ragged``: validate a prefill batch and pack its tiles onto the CTAs.

Tiles. Each request with qo_len q > 0 is cut into query tiles of ``q_tile`` tokens; query tile
[t0, t1) of kv_head h needs the KV tokens [0, extent): all kv_len of them, or under causal masking
(aligned to the end of the KV: query i sees positions <= kv_len - q + i) only the first
``max(0, kv_len - q + t1)``. A request with kv_len 0 still gets its tiles: they write zeros / -inf.
Causal qo_len > kv_len is allowed (FlashInfer's semantics; it arises with padding and chunked
prefill): query rows i < q - kv_len see no key and get output 0 and LSE -inf, the rest attend
normally; a query tile whose rows all see nothing has an empty KV range.

Split-KV. With E = the sum of all tile extents, the chunk length is ``c = max(MIN_CHUNK_TOKENS,
ceil(E / num_ctas))``; a tile with extent e > c becomes n = ceil(e / c) near-equal chunks, each
query token of it then gets n consecutive partial slots and one merge entry. Bounds (the layout's
capacities): every split tile has e > c >= E / num_ctas, so fewer than num_ctas tiles split; the
pieces number sum(n) < E / c + #split <= 2 * num_ctas - 1, so tiles grow by < num_ctas; and
n <= num_ctas. Deterministic settings never split (a row's result then depends on its own tile only).
When queries are many (E spread over >= num_ctas tiles) nothing is split; few queries over a long
KV are split about num_ctas ways.

Tile rows. Query tiles hold ``layout.q_tile`` tokens (``layout.tile_rows`` rows of tokens x GQA
heads: the launch tuning table's query tile). A batch of short queries only (every qo_len x group
<= 16 rows) reports ``tile_rows`` 16: the runtime then launches the 16-row (one-warp) shape of the
tensor-core kernel; its tiles are the same ones (one per request and kv_head), so the capacities
do not change.

Balance. Tiles cost ``kv tokens + TILE_OVERHEAD_TOKENS`` (decode's cost model); they are placed
longest first, each on the least-loaded CTA (LPT, a binary heap), and stored grouped by CTA.

Validation happens in the njit core too: errors come back as a code and an index and are raised
here (InputError for malformed tables, PlanError beyond the Settings bounds), before any plan exists.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numba import njit

from tilegraph.errors import InputError, PlanError

from .decode import E_CAPACITY, INT32_MAX, R_ERROR, R_INDEX, R_MAX_PAGE, R_VALUE, S_KV_INDICES, S_KV_INDPTR
from .decode import S_KV_LEN, raise_plan_error, validate_page_table
from .validation import validate_block_lengths, validate_page_lengths
from .layout import H_NUM_PAGES, H_BATCH_SIZE, H_NUM_MERGES, H_NUM_SLOTS, H_NUM_TILES, H_PLAN_SERIAL, HEADER_WORDS
from .plan import TILE_OVERHEAD_TOKENS, balance_of, layout_live_table, ranges_of_table
from .validation import IndexInput, index_input, index_length, index_view
from .prefill_layout import H_NUM_TOKENS, PREFILL_SECTIONS, ROWS_PER_TILE, TILE_SECTIONS, PrefillLayout

#: the shortest KV chunk a tile is split into (tokens)
MIN_CHUNK_TOKENS = 32

# layout parameters for the njit core
P_PAGE_SIZE, P_KV_HEADS, P_NUM_CTAS, P_MAX_PAGE_REFS, P_Q_TILE, P_TILE_CAP, P_MERGE_CAP, P_SLOT_CAP = range(8)
P_MAX_TOKENS, P_SPLIT, P_CAUSAL = 8, 9, 10
P_OFFSETS = 11  # then one start offset per section, in PREFILL_SECTIONS order
# section indices (the njit core reads sections by index), looked up by name in the layout's table
_O = {name: index for index, name in enumerate(PREFILL_SECTIONS)}
O_HEADER, O_CTA_TILE_INDPTR, O_CTA = _O["header"], _O["cta_tile_indptr"], _O["tile_cta"]
O_REQUEST, O_Q_START, O_Q_END = _O["tile_request"], _O["tile_q_start"], _O["tile_q_end"]
O_KV_HEAD, O_KV_START, O_KV_END = _O["tile_kv_head"], _O["tile_kv_start"], _O["tile_kv_end"]
O_SLOT, O_SLOT_STRIDE = _O["tile_slot"], _O["tile_slot_stride"]
O_MERGE_INDPTR, O_MERGE_REQUEST, O_MERGE_KV_HEAD = _O["merge_slot_indptr"], _O["merge_request"], _O["merge_kv_head"]
O_QO_INDPTR, O_KV_INDPTR, O_KV_INDICES, O_KV_LEN = _O["qo_indptr"], _O["kv_indptr"], _O["kv_indices"], _O["kv_len"]

# result words (R_ERROR, R_INDEX, R_VALUE, R_MAX_PAGE shared with the decode planner's validation)
R_TILES, R_MERGES, R_SLOTS, R_MAKESPAN, R_KV_TOKENS, R_NUM_TOKENS, R_IDEAL_TOTAL, R_VALUE2 = range(9, 17)
R_MAX_QO = 17  # the longest qo_len of the batch
RESULT_WORDS = 18

# prefill-specific error codes (1..8 are the decode planner's page-table codes)
E_QO_START, E_QO_DECREASING, E_QO_TOKENS, E_CAUSAL, E_KV_START, E_KV_DECREASING, E_KV_TOKENS = range(20, 27)


# ---- njit core ---------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _validate_qo(qo_indptr, max_num_tokens, buf, o_qo, result):
    """Check qo_indptr and copy it into ``buf``. False on an error."""
    batch = qo_indptr.shape[0] - 1
    if qo_indptr[0] != 0:
        result[R_ERROR], result[R_VALUE] = E_QO_START, qo_indptr[0]
        return False
    for i in range(batch):
        if qo_indptr[i + 1] < qo_indptr[i]:
            result[R_ERROR], result[R_INDEX] = E_QO_DECREASING, i
            return False
    if qo_indptr[batch] > max_num_tokens:
        result[R_ERROR], result[R_VALUE] = E_QO_TOKENS, qo_indptr[batch]
        return False
    buf[o_qo : o_qo + batch + 1] = qo_indptr
    return True


@njit(cache=True, nogil=True)
def _validate_ragged_kv(kv_indptr, buf, o_kv_indptr, o_kv_len, result):
    """Check a ragged kv_indptr (token offsets), copy it and its lengths into ``buf``."""
    batch = kv_indptr.shape[0] - 1
    if kv_indptr[0] != 0:
        result[R_ERROR], result[R_VALUE] = E_KV_START, kv_indptr[0]
        return False
    for i in range(batch):
        if kv_indptr[i + 1] < kv_indptr[i]:
            result[R_ERROR], result[R_INDEX] = E_KV_DECREASING, i
            return False
        buf[o_kv_len + i] = kv_indptr[i + 1] - kv_indptr[i]
    buf[o_kv_indptr : o_kv_indptr + batch + 1] = kv_indptr
    result[R_MAX_PAGE] = -1
    return True


@njit(cache=True, nogil=True, inline="always")
def _extent(kv_len, qo_len, t1, causal):
    """KV tokens the query tile ending at request-local token t1 needs."""
    if causal:
        return max(np.int64(0), kv_len - qo_len + t1)  # rows before kv_len - qo_len + 1 see no key
    return kv_len


@njit(cache=True, nogil=True)
def _heap_push_down(heap_load, heap_cta, i, n):
    """Restore the min-heap (by load, then CTA index) below position i."""
    while True:
        left = 2 * i + 1
        if left >= n:
            return
        best = left
        right = left + 1
        if right < n and (heap_load[right], heap_cta[right]) < (heap_load[left], heap_cta[left]):
            best = right
        if (heap_load[best], heap_cta[best]) >= (heap_load[i], heap_cta[i]):
            return
        heap_load[i], heap_load[best] = heap_load[best], heap_load[i]
        heap_cta[i], heap_cta[best] = heap_cta[best], heap_cta[i]
        i = best


@njit(cache=True, nogil=True)
def _plan_core(qo_indptr, serial, params, buf, result):
    """Make the tiles of a validated batch (kv_len already in ``buf``), split, balance, write the plan."""
    off = params[P_OFFSETS:]
    num_kv_heads, num_ctas, q_tile = params[P_KV_HEADS], params[P_NUM_CTAS], params[P_Q_TILE]
    causal = params[P_CAUSAL] != 0
    batch = qo_indptr.shape[0] - 1
    kv_len = buf[off[O_KV_LEN] : off[O_KV_LEN] + batch]
    overhead = np.int64(TILE_OVERHEAD_TOKENS)
    # pass 1: extents, totals
    extent_sum = np.int64(0)
    num_query_tiles = np.int64(0)
    kv_tokens = np.int64(0)
    max_qo = np.int64(0)
    for r in range(batch):
        qo_len = np.int64(qo_indptr[r + 1]) - qo_indptr[r]
        length = np.int64(kv_len[r])
        kv_tokens += length
        max_qo = max(max_qo, qo_len)
        for t0 in range(0, qo_len, q_tile):
            extent_sum += _extent(length, qo_len, min(qo_len, t0 + q_tile), causal)
            num_query_tiles += 1
    num_query_tiles *= num_kv_heads
    extent_sum *= num_kv_heads
    chunk = max(np.int64(MIN_CHUNK_TOKENS), (extent_sum + num_ctas - 1) // num_ctas)
    if params[P_SPLIT] == 0:
        chunk = np.int64(INT32_MAX)
    # pass 2: tiles in request order (pieces of a split in KV order), slots and merges
    tile_cap = params[P_TILE_CAP]
    t_request = np.empty(tile_cap, np.int64)
    t_q0 = np.empty(tile_cap, np.int64)
    t_q1 = np.empty(tile_cap, np.int64)
    t_head = np.empty(tile_cap, np.int64)
    t_kv0 = np.empty(tile_cap, np.int64)
    t_kv1 = np.empty(tile_cap, np.int64)
    t_slot = np.empty(tile_cap, np.int64)
    t_stride = np.empty(tile_cap, np.int64)
    n = num_merges = num_slots = np.int64(0)
    o_m_indptr, o_m_request, o_m_head = off[O_MERGE_INDPTR], off[O_MERGE_REQUEST], off[O_MERGE_KV_HEAD]
    merge_cap, slot_cap = params[P_MERGE_CAP], params[P_SLOT_CAP]
    buf[o_m_indptr] = 0
    for r in range(batch):
        qo_begin = np.int64(qo_indptr[r])
        qo_len = np.int64(qo_indptr[r + 1]) - qo_begin
        length = np.int64(kv_len[r])
        for t0 in range(0, qo_len, q_tile):
            t1 = min(qo_len, t0 + q_tile)
            extent = _extent(length, qo_len, t1, causal)
            pieces = (extent + chunk - 1) // chunk if extent > chunk else np.int64(1)
            for head in range(num_kv_heads):
                if n + pieces > tile_cap:
                    result[R_ERROR], result[R_VALUE] = E_CAPACITY, n + pieces
                    return
                base = np.int64(-1)
                if pieces > 1:
                    base = num_slots
                    num_slots += (t1 - t0) * pieces
                    if num_slots > slot_cap or num_merges + (t1 - t0) > merge_cap:
                        result[R_ERROR], result[R_VALUE] = E_CAPACITY, num_slots
                        return
                    for i in range(t1 - t0):
                        buf[o_m_request + num_merges], buf[o_m_head + num_merges] = qo_begin + t0 + i, head
                        num_merges += 1
                        buf[o_m_indptr + num_merges] = base + (i + 1) * pieces
                q, rem = extent // pieces, extent % pieces
                for c in range(pieces):
                    start = c * q + min(c, rem)
                    t_request[n], t_q0[n], t_q1[n], t_head[n] = r, t0, t1, head
                    t_kv0[n], t_kv1[n] = start, start + q + (1 if c < rem else 0)
                    t_slot[n], t_stride[n] = (base + c, pieces) if pieces > 1 else (np.int64(-1), np.int64(0))
                    n += 1
    # LPT: longest first onto the least-loaded CTA
    cost = np.empty(n, np.int64)
    for t in range(n):
        cost[t] = t_kv1[t] - t_kv0[t] + overhead
    order = np.argsort(-cost, kind="mergesort")
    heap_load = np.zeros(num_ctas, np.int64)
    heap_cta = np.arange(num_ctas).astype(np.int64)
    tile_cta = np.empty(n, np.int64)
    per_cta = np.zeros(num_ctas + 1, np.int64)
    for t in order:
        cta = heap_cta[0]
        tile_cta[t] = cta
        per_cta[cta + 1] += 1
        heap_load[0] += cost[t]
        _heap_push_down(heap_load, heap_cta, 0, num_ctas)
    makespan = np.int64(0)
    for i in range(num_ctas):
        makespan = max(makespan, heap_load[i])
    # store grouped by CTA, each CTA's tiles in LPT order
    o_indptr = off[O_CTA_TILE_INDPTR]
    for c in range(num_ctas):
        per_cta[c + 1] += per_cta[c]
        buf[o_indptr + c + 1] = per_cta[c + 1]
    buf[o_indptr] = 0
    fill = per_cta[:num_ctas].copy()
    for t in order:
        cta = tile_cta[t]
        p = fill[cta]
        fill[cta] += 1
        buf[off[O_REQUEST] + p], buf[off[O_Q_START] + p], buf[off[O_Q_END] + p] = t_request[t], t_q0[t], t_q1[t]
        buf[off[O_KV_HEAD] + p], buf[off[O_KV_START] + p], buf[off[O_KV_END] + p] = t_head[t], t_kv0[t], t_kv1[t]
        buf[off[O_SLOT] + p], buf[off[O_SLOT_STRIDE] + p], buf[off[O_CTA] + p] = t_slot[t], t_stride[t], cta
    header = buf[off[O_HEADER] : off[O_HEADER] + HEADER_WORDS]
    header[:] = 0
    header[H_NUM_TILES], header[H_NUM_MERGES], header[H_BATCH_SIZE] = n, num_merges, batch
    header[H_NUM_SLOTS], header[H_PLAN_SERIAL], header[H_NUM_TOKENS] = num_slots, serial, qo_indptr[batch]
    result[R_TILES], result[R_MERGES], result[R_SLOTS], result[R_MAKESPAN] = n, num_merges, num_slots, makespan
    result[R_KV_TOKENS], result[R_NUM_TOKENS] = kv_tokens, qo_indptr[batch]
    result[R_IDEAL_TOTAL] = extent_sum + num_query_tiles * overhead
    result[R_MAX_QO] = max_qo


@njit(cache=True, nogil=True)
def _plan_paged(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, num_pages, serial, params, buf, result):
    """Validate the query offsets and the page table (copied into the plan), then plan. The index
    arrays come as ``index_input`` made them (so do the other cores')."""
    qo_indptr, kv_indptr, kv_indices = index_view(qo_indptr), index_view(kv_indptr), index_view(kv_indices)
    kv_last_page_len = index_view(kv_last_page_len)
    result[:] = 0
    off = params[P_OFFSETS:]
    if not _validate_qo(qo_indptr, params[P_MAX_TOKENS], buf, off[O_QO_INDPTR], result):
        return
    # the decode planner's page-table validation, pointed at this layout's sections
    decode_off = _decode_offsets(off)
    if not validate_page_table(kv_indptr, kv_indices, kv_last_page_len, num_pages, params[P_PAGE_SIZE], params[P_MAX_PAGE_REFS], buf, decode_off, result):
        return
    _plan_core(qo_indptr, serial, params, buf, result)
    buf[off[O_HEADER] + H_NUM_PAGES] = min(num_pages, INT32_MAX)


@njit(cache=True, nogil=True)
def _decode_offsets(off):
    """The decode planner's page-table section offsets, pointed at this layout's sections."""
    decode_off = np.zeros(14, np.int64)
    decode_off[S_KV_INDPTR], decode_off[S_KV_INDICES], decode_off[S_KV_LEN] = off[O_KV_INDPTR], off[O_KV_INDICES], off[O_KV_LEN]
    return decode_off


@njit(cache=True, nogil=True)
def _plan_paged_device(qo_indptr, kv_indptr, kv_last_page_len, num_indices, num_pages, serial, params, buf, result):
    """As _plan_paged for page ids that stay on the device: lengths checked, nothing copied."""
    qo_indptr, kv_indptr, kv_last_page_len = index_view(qo_indptr), index_view(kv_indptr), index_view(kv_last_page_len)
    result[:] = 0
    off = params[P_OFFSETS:]
    if not _validate_qo(qo_indptr, params[P_MAX_TOKENS], buf, off[O_QO_INDPTR], result):
        return
    if not validate_page_lengths(kv_indptr, kv_last_page_len, num_indices, params[P_PAGE_SIZE], params[P_MAX_PAGE_REFS], buf, _decode_offsets(off), result):
        return
    _plan_core(qo_indptr, serial, params, buf, result)
    buf[off[O_HEADER] + H_NUM_PAGES] = min(num_pages, INT32_MAX)


@njit(cache=True, nogil=True)
def _plan_paged_blocks(qo_indptr, seq_lens, row_stride, max_blocks, span, num_pages, serial, params, buf, result):
    """As _plan_paged for a device block table: per-request lengths checked, nothing copied."""
    qo_indptr, seq_lens = index_view(qo_indptr), index_view(seq_lens)
    result[:] = 0
    off = params[P_OFFSETS:]
    if not _validate_qo(qo_indptr, params[P_MAX_TOKENS], buf, off[O_QO_INDPTR], result):
        return
    if not validate_block_lengths(seq_lens, row_stride, max_blocks, span, params[P_PAGE_SIZE], params[P_MAX_PAGE_REFS], buf, _decode_offsets(off), result):
        return
    _plan_core(qo_indptr, serial, params, buf, result)
    buf[off[O_HEADER] + H_NUM_PAGES] = min(num_pages, INT32_MAX)


@njit(cache=True, nogil=True)
def _plan_ragged(qo_indptr, kv_indptr, serial, params, buf, result):
    qo_indptr, kv_indptr = index_view(qo_indptr), index_view(kv_indptr)
    result[:] = 0
    off = params[P_OFFSETS:]
    if not _validate_qo(qo_indptr, params[P_MAX_TOKENS], buf, off[O_QO_INDPTR], result):
        return
    if not _validate_ragged_kv(kv_indptr, buf, off[O_KV_INDPTR], off[O_KV_LEN], result):
        return
    _plan_core(qo_indptr, serial, params, buf, result)


# ---- the plan object ---------------------------------------------------------------------------------


class PrefillPlan:
    """A prefill plan: ``buffer`` (int32, ``layout.plan_words``, laid out as planner/prefill_layout.py
    says) and stats. Section views span the full capacity; only the first ``num_tiles`` /
    ``num_merges`` / ``batch_size`` entries are live."""

    def __init__(self, layout: PrefillLayout, buffer: np.ndarray, serial: int, causal: bool, batch_size: int, result: np.ndarray):
        self.layout = layout
        self.buffer = buffer
        self.serial = serial
        self.causal = causal
        self.batch_size = batch_size
        self.num_ctas = layout.num_ctas
        self.num_tiles = int(result[R_TILES])
        self.num_merges = int(result[R_MERGES])
        self.num_slots = int(result[R_SLOTS])
        self.num_tokens = int(result[R_NUM_TOKENS])  # query tokens (qo_indptr[-1])
        self.kv_tokens = int(result[R_KV_TOKENS])  # sum of kv_len
        self.makespan = int(result[R_MAKESPAN])  # largest CTA load (tokens + overhead per tile)
        self.ideal = int(result[R_IDEAL_TOTAL]) / layout.num_ctas  # unsplit cost spread evenly
        self.balance = balance_of(self.ideal, self.makespan)
        self.max_page_index = int(result[R_MAX_PAGE])  # -1: no page referenced (or ragged)
        self.page_table = "host"  # or "device" / "block_table" (planner.plan.Plan.page_table)
        self.max_qo_len = int(result[R_MAX_QO])
        # short queries only (every request within one 16-row tile): the plan asks for the 16-row launch
        # shape; its tiles are the same either way (one query tile per request and kv_head)
        short = self.max_qo_len * layout.group_size <= ROWS_PER_TILE
        self.tile_rows = ROWS_PER_TILE if short else layout.tile_rows

    def live_ranges(self) -> list[tuple[int, int]]:
        """The word ranges of ``buffer`` the kernels read (planner.plan.live_ranges); a ragged plan's
        kv_indptr holds KV token offsets, so no page id is staged."""
        host_indices = self.page_table == "host" and self.layout.paged
        table, kv_indptr_start = layout_live_table(self.layout)
        return ranges_of_table(table, kv_indptr_start, self.buffer, self.num_tiles, self.num_merges, self.batch_size,
                               host_indices)  # fmt: skip

    def section(self, name: str) -> np.ndarray:
        """A read-only view of one buffer section at full capacity (names: PREFILL_SECTIONS)."""
        start, stop = self.layout.offsets()[name]
        view = self.buffer[start:stop]
        view.flags.writeable = False
        return view

    def tiles(self) -> dict[str, np.ndarray]:
        """The live tiles, by field name without the ``tile_`` prefix (int64 copies)."""
        return {name[5:]: self.section(name)[: self.num_tiles].astype(np.int64) for name in TILE_SECTIONS}

    def merges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slot indptr [num_merges + 1], query token [num_merges], kv_head [num_merges])."""
        m = self.num_merges
        return (self.section("merge_slot_indptr")[: m + 1].copy(), self.section("merge_request")[:m].copy(),
                self.section("merge_kv_head")[:m].copy())  # fmt: skip

    def tiles_per_cta(self) -> np.ndarray:
        """Number of tiles each CTA runs."""
        return np.diff(self.section("cta_tile_indptr").astype(np.int64))

    # the decode plan's inspection names (planner.plan.Plan), so a BatchDecode plan reads the same on
    # either engine: tile fields at full capacity, the first num_tiles live
    request = property(lambda self: self.section("tile_request"))
    kv_head = property(lambda self: self.section("tile_kv_head"))
    token_start = property(lambda self: self.section("tile_kv_start"))
    token_end = property(lambda self: self.section("tile_kv_end"))
    slot = property(lambda self: self.section("tile_slot"))
    cta = property(lambda self: self.section("tile_cta"))
    cta_tile_indptr = property(lambda self: self.section("cta_tile_indptr"))

    def cta_loads(self) -> np.ndarray:
        tiles = self.tiles()
        cost = tiles["kv_end"] - tiles["kv_start"] + TILE_OVERHEAD_TOKENS
        return np.bincount(tiles["cta"], weights=cost, minlength=self.num_ctas).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"PrefillPlan(#{self.serial}: {self.batch_size} requests, {self.num_tokens} query tokens, "
            f"{self.num_tiles} tiles, {self.num_merges} merges / {self.num_slots} slots on {self.num_ctas} CTAs, "
            f"makespan {self.makespan}, balance {self.balance:.3f})"
        )


# ---- Python entry --------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _layout_params(layout: PrefillLayout, causal: bool, allow_split: bool) -> tuple[np.ndarray, int]:
    offsets = layout.offsets()
    head = [layout.page_size, layout.num_kv_heads, layout.num_ctas, layout.max_page_refs, layout.q_tile,
            layout.tile_capacity, layout.merge_capacity, layout.slot_capacity, layout.max_num_tokens,
            int(allow_split and not layout.deterministic), int(causal)]  # fmt: skip
    params = np.array(head + [offsets[name][0] for name in PREFILL_SECTIONS], dtype=np.int64)
    params.flags.writeable = False
    return params, layout.plan_words


def _raise_prefill(result: np.ndarray, layout: PrefillLayout, num_pages: int, batch: int) -> None:
    code, index, value = int(result[R_ERROR]), int(result[R_INDEX]), int(result[R_VALUE])
    if code == E_QO_START:
        raise InputError(f"qo_indptr[0] must be 0, got {value}")
    if code == E_QO_DECREASING:
        raise InputError(f"qo_indptr must be non-decreasing, but qo_indptr[{index + 1}] < qo_indptr[{index}]")
    if code == E_QO_TOKENS:
        raise PlanError(f"qo_indptr[-1]={value} query tokens exceed max_num_tokens={layout.max_num_tokens} (Settings)")
    if code == E_KV_START:
        raise InputError(f"kv_indptr[0] must be 0, got {value}")
    if code == E_KV_DECREASING:
        raise InputError(f"kv_indptr must be non-decreasing, but kv_indptr[{index + 1}] < kv_indptr[{index}]")
    raise_plan_error(result, layout, num_pages, batch)  # type: ignore[arg-type]  (page-table codes)


def _check_batch(layout: PrefillLayout, qo: IndexInput, batch: int, name: str, length: int) -> None:
    if index_length(qo) < 1:
        raise InputError("qo_indptr must have B + 1 >= 1 entries")
    if length != batch + 1:
        raise InputError(f"{name} must have len(qo_indptr) = {batch + 1} entries, got {length}")
    if batch > layout.max_batch_size:
        raise PlanError(f"batch size {batch} exceeds max_batch_size={layout.max_batch_size} (Settings)")


def plan_prefill(
    layout: PrefillLayout,
    qo_indptr: Any,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    num_pages: int,
    causal: bool,
    serial: int = 0,
    allow_split: bool = True,
) -> PrefillPlan:
    """Validate a paged prefill batch and balance its tiles over ``layout.num_ctas`` CTAs.

    qo_indptr [B+1] (query token offsets), kv_indptr [B+1], kv_indices [>= kv_indptr[-1]],
    kv_last_page_len [B]: int32 CPU torch tensors or numpy arrays (page table as for decode).
    ``allow_split`` False: never split a tile's KV (as deterministic settings do)."""
    qo, indptr, last = _paged_lengths(layout, qo_indptr, kv_indptr, kv_last_page_len, num_pages)
    indices = index_input(kv_indices, "kv_indices")
    return _run_paged(layout, _plan_paged, (qo, indptr, indices, last), num_pages, causal, serial, allow_split, "host")


def plan_prefill_device(layout: PrefillLayout, qo_indptr: Any, kv_indptr: Any, kv_last_page_len: Any, num_indices: int,
                        num_pages: int, causal: bool, serial: int = 0, allow_split: bool = True) -> PrefillPlan:  # fmt: skip
    """``plan_prefill`` for page ids that stay on the device (``num_indices`` of them, read by the
    kernels and guarded there against ``num_pages``); only the host lengths are read."""
    qo, indptr, last = _paged_lengths(layout, qo_indptr, kv_indptr, kv_last_page_len, num_pages)
    args = (qo, indptr, last, int(num_indices))  # Python ints: numba types them faster than np.int64
    return _run_paged(layout, _plan_paged_device, args, num_pages, causal, serial, allow_split, "device")


def plan_prefill_block_table(layout: PrefillLayout, qo_indptr: Any, seq_lens: Any, row_stride: int, max_blocks: int,
                             span: int, num_pages: int, causal: bool, serial: int = 0,
                             allow_split: bool = True) -> PrefillPlan:  # fmt: skip
    """``plan_prefill`` for a device block table (planner.decode.plan_decode_block_table's contract):
    ``seq_lens`` [B] host int32 KV tokens per request (query tokens included)."""
    if not layout.paged:
        raise InputError("plan_prefill_block_table needs a paged layout")
    qo = index_input(qo_indptr, "qo_indptr")
    lengths = index_input(seq_lens, "seq_lens")
    entries = index_length(qo)
    _check_batch(layout, qo, entries - 1, "qo_indptr", entries)
    _check_per_request(lengths, "seq_lens", entries - 1, num_pages)
    args = (qo, lengths, int(row_stride), int(max_blocks), int(span))
    return _run_paged(layout, _plan_paged_blocks, args, num_pages, causal, serial, allow_split, "block_table")


def _paged_lengths(layout: PrefillLayout, qo_indptr: Any, kv_indptr: Any, kv_last_page_len: Any,
                   num_pages: int) -> tuple[IndexInput, IndexInput, IndexInput]:  # fmt: skip
    if not layout.paged:
        raise InputError("plan_prefill needs a paged layout (use plan_prefill_ragged)")
    qo = index_input(qo_indptr, "qo_indptr")
    indptr = index_input(kv_indptr, "kv_indptr")
    last = index_input(kv_last_page_len, "kv_last_page_len")
    batch = index_length(qo) - 1
    _check_batch(layout, qo, batch, "kv_indptr", index_length(indptr))
    _check_per_request(last, "kv_last_page_len", batch, num_pages)
    return qo, indptr, last


def _check_per_request(values: IndexInput, name: str, batch: int, num_pages: int) -> None:
    """``values`` (an ``index_input`` result) has one entry per request and ``num_pages`` is not negative."""
    entries = index_length(values)
    if entries != batch:
        raise InputError(f"{name} must have len(qo_indptr) - 1 = {batch} entries, got {entries}")
    if num_pages < 0:
        raise InputError(f"num_pages must be >= 0, got {num_pages}")


def _run_paged(layout: PrefillLayout, core: Any, args: tuple[Any, ...], num_pages: int, causal: bool, serial: int,
               allow_split: bool, page_table: str) -> PrefillPlan:  # fmt: skip
    params, words = _layout_params(layout, bool(causal), bool(allow_split))
    buffer = np.empty(words, dtype=np.int32)
    result = np.zeros(RESULT_WORDS, dtype=np.int64)
    core(*args, num_pages, serial, params, buffer, result)
    batch = index_length(args[0]) - 1
    if result[R_ERROR]:
        _raise_prefill(result, layout, num_pages, batch)
    plan = PrefillPlan(layout, buffer, serial, bool(causal), batch, result)
    if page_table != "host":
        plan.page_table = page_table
        plan.max_page_index = -1  # the host read no page id
    return plan


def plan_prefill_ragged(
    layout: PrefillLayout, qo_indptr: Any, kv_indptr: Any, causal: bool, serial: int = 0, allow_split: bool = True
) -> PrefillPlan:
    """Validate a ragged prefill batch (kv_indptr [B+1]: KV token offsets) and balance its tiles."""
    if layout.paged:
        raise InputError("plan_prefill_ragged needs a ragged layout (use plan_prefill)")
    qo = index_input(qo_indptr, "qo_indptr")
    indptr = index_input(kv_indptr, "kv_indptr")
    batch = index_length(qo) - 1
    _check_batch(layout, qo, batch, "kv_indptr", index_length(indptr))
    params, words = _layout_params(layout, bool(causal), bool(allow_split))
    buffer = np.empty(words, dtype=np.int32)
    result = np.zeros(RESULT_WORDS, dtype=np.int64)
    _plan_ragged(qo, indptr, serial, params, buffer, result)
    if result[R_ERROR]:
        _raise_prefill(result, layout, 0, batch)
    return PrefillPlan(layout, buffer, serial, bool(causal), batch, result)
