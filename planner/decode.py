"""``plan_decode``: validate a paged page table and place its work tiles on the persistent CTAs.

Cost model (plan.py): a tile of t KV tokens costs ``t + TILE_OVERHEAD_TOKENS``; the makespan is the
largest CTA load. Non-deterministic layouts keep the best of three schedules:

  * the two anchors' (anchors.py: FlashInfer's decode and persistent chunkings, longest request
    first onto the least-loaded CTA), scheduled first, and only those that may beat our packing:
    its makespan is at most the search's ``hi`` (below), so an anchor is not scheduled at all when
    its ``makespan_lower_bound``, probed with ``hi``, is not below ``hi`` nor below the other
    anchor's makespan;
  * our packing, searched only below the better anchor's makespan, writing its tiles into the
    plan as it goes. If it finds no such plan the anchor is written -- so the plan is never worse
    than either, and the packing may go below ``hi`` to beat an anchor where the search's
    tolerance alone would have stopped at ``hi``.

Our packing: a greedy pass at a CTA capacity ``M`` fills CTA 0, 1, ... in turn with (1) the rest
of the pair split at the end of the previous CTA (or a piece of it filling this one), (2) whole
(request, kv_head) pairs from the long end of the length-sorted pairs while they fit, (3) whole
pairs from the short end while they fit, (4) a piece of the longest pair filling the gap -- unless
the CTAs still to come can take all the remaining work anyway. A CTA leaves at most
``TILE_OVERHEAD_TOKENS + 1`` unused (a gap, or a continued piece's overhead), so
``M = ceil(total / num_ctas) + TILE_OVERHEAD_TOKENS + 2`` always fits; a search over ``M`` (an
estimate from each failed pass, then bisection) finds the smallest within 1/REFINE_RATIO. At most
one split ends each CTA: tiles <= kv_heads * B + num_ctas, the layout's capacity (checked on every
pass). A split pair's pieces run in token order on consecutive CTAs and take consecutive partial
slots and one merge entry.

Deterministic layouts cut every request into ``DETERMINISTIC_CHUNK_TOKENS`` chunks (the last shorter)
whatever else is batched, and place them longest first on the least-loaded CTA; a split pair's slots
and its merge entry follow token order, so its result depends on its own chunks only.

Everything after the Python argument checks runs in one numba ``njit`` call; validation errors come
back as a code and an index and are raised here, before a plan exists.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from numba import njit

from tilegraph.errors import InputError, PlanError

from .validation import E_CAPACITY, INT32_MAX, R_ERROR, R_INDEX, R_KV_TOKENS, R_MAKESPAN, R_MAX_PAGE  # noqa: F401
from .validation import R_MERGES, R_SLOTS, R_TILES, R_VALUE, R_WORDS, as_index_array, raise_plan_error, validate_page_table  # noqa: F401
from .validation import IndexInput, index_input, index_length, index_view, validate_block_lengths, validate_page_lengths

from .layout import DECODE_SECTIONS, DETERMINISTIC_CHUNK_TOKENS, H_BATCH_SIZE, H_NUM_MERGES, H_NUM_SLOTS
from .layout import H_NUM_PAGES, H_NUM_TILES, H_PLAN_SERIAL, HEADER_WORDS, DecodeLayout
from .anchors import SORT_COUNT_WORDS, chunk_groups, decode_chunk_tokens, makespan_lower_bound, persistent_chunk_tokens, sort_longest_first
from .lpt import TREE_KEY_WORDS, lpt_blocks
from .plan import TILE_OVERHEAD_TOKENS, Plan
from .simd import store_int32x4

# layout parameters passed to the njit core (one int64 array per layout)
P_PAGE_SIZE, P_KV_HEADS, P_NUM_CTAS, P_MAX_PAGE_REFS, P_CHUNK, P_TILE_CAP, P_MERGE_CAP, P_SLOT_CAP, P_BATCH_CAP = range(9)
P_OFFSETS = 9  # then one start offset per section, in layout order
P_WORDS = P_OFFSETS + len(DECODE_SECTIONS)
# section indices (the njit core reads sections by index), looked up by name in the layout's table
_S = {name: index for index, name in enumerate(DECODE_SECTIONS)}
S_HEADER, S_CTA_TILE_INDPTR = _S["header"], _S["cta_tile_indptr"]
S_REQUEST, S_KV_HEAD, S_SLOT = _S["tile_request"], _S["tile_kv_head"], _S["tile_slot"]
S_START, S_END = _S["tile_token_start"], _S["tile_token_end"]
S_MERGE_INDPTR, S_MERGE_REQUEST, S_MERGE_KV_HEAD = _S["merge_slot_indptr"], _S["merge_request"], _S["merge_kv_head"]
S_KV_INDPTR, S_KV_INDICES, S_KV_LEN = _S["kv_indptr"], _S["kv_indices"], _S["kv_len"]

#: kv_heads up to which a whole pair's tiles go out as 16-byte stores (``_put_whole_vector``: two a section)
VECTOR_MOST_HEADS = 8
#: the capacity search stops once the capacity found is within 1/REFINE_RATIO of the lower bound
REFINE_RATIO = 256
NO_MAKESPAN = 1 << 62

# the core's work rows of tile capacity: a block-CTA per block tile for each anchor
X_ASSIGNMENT, X_SPARE = 0, 1
SCRATCH_ROWS = 2
# its rows of batch capacity: the sort's (two rows of words, the sorted lengths), the packing's (left, taken)
Y_WORDS, Y_MOVED, Y_LENGTHS, Y_LEFT, Y_TAKEN = range(5)
BATCH_ROWS = 5
# the core's per-thread int64 state (``_core_inputs``; one array: numba's dispatch types each argument,
# and the core allocates nothing): the layout's P_WORDS parameter words, the R_WORDS result words,
# the SCRATCH_ROWS and BATCH_ROWS work rows, the sort's digit counts and the LPT tree's keys
STATE_RESULT = P_WORDS
STATE_SCRATCH = STATE_RESULT + R_WORDS

# ---- njit core ---------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _pack(capacity, emit, order, by_length, num_kv_heads, num_ctas, tile_cap, merge_cap, total, left, taken, buf, off,
          scalar_heads):  # fmt: skip
    """One greedy pass at CTA capacity ``capacity`` over whole (request, kv_head) pairs: ``order``,
    requests longest first, ``by_length`` their kv_len in that order (see the module docstring; the
    pass walks sorted positions p, fewest tokens first: index batch - 1 - p, so the lengths are read
    in a row, not gathered by request). Returns (fits, num_tiles, num_merges, num_slots, makespan,
    next capacity to try); only when ``emit`` writes tiles, merges and the CTA index into the plan.
    ``scalar_heads``: None when num_kv_heads <= VECTOR_MOST_HEADS (whole pairs go out as 16-byte
    stores), else num_kv_heads (a store a word); the type picks the compiled pass."""
    overhead = np.int64(TILE_OVERHEAD_TOKENS)
    loss = overhead + 2  # most a CTA leaves unused: the bound behind the lazy split and early exit
    # plain offsets, no array views: the loops stay free of reference counting
    o_indptr = off[S_CTA_TILE_INDPTR]
    o_m_indptr, o_m_request, o_m_head = off[S_MERGE_INDPTR], off[S_MERGE_REQUEST], off[S_MERGE_KV_HEAD]
    tile_at = _tile_offsets(off)
    left[:] = num_kv_heads  # per sorted position, kv_heads [taken, taken + left) are free
    taken[:] = 0
    lo, hi = 0, order.shape[0] - 1  # sorted positions: lo = fewest tokens
    last = np.uint64(order.shape[0] - 1)  # position p is index last - p of order / by_length
    remaining = total  # unsplit cost not yet placed
    num_tiles = num_merges = num_slots = makespan = np.int64(0)
    cur_rem = np.int64(-1)  # tokens left of the pair being split (-1: none)
    cur_request = cur_head = cur_pos = np.int64(0)
    if emit:
        buf[o_indptr] = 0
        buf[o_m_indptr] = 0
        # whole pairs start at token 0 and have no slot: those words filled ahead (a memset each),
        # so a whole pair's tiles take three stores, not five
        most = np.int64(min(tile_cap, order.shape[0] * num_kv_heads + num_ctas))
        buf[off[S_START] : off[S_START] + most] = 0
        buf[off[S_SLOT] : off[S_SLOT] + most] = -1
    for cta in range(num_ctas):
        if cur_rem < 0 and lo > hi:
            if emit:
                buf[o_indptr + cta + 1 : o_indptr + num_ctas + 1] = num_tiles
            break
        if remaining > (num_ctas - cta) * capacity:  # cannot fit any more
            lost = cta * capacity - (total - remaining) + (overhead if cur_rem >= 0 else 0)
            return False, num_tiles, num_merges, num_slots, makespan, _suggest(capacity, cta, lost, total, num_ctas)
        if not emit and cur_rem < 0 and remaining <= (num_ctas - cta) * (capacity - loss):
            return True, num_tiles, num_merges, num_slots, makespan, capacity  # the rest surely fits
        space = capacity
        # 1. the next piece of a split pair: all of it, or a piece filling the CTA
        if cur_rem >= 0:
            if num_tiles + 1 > tile_cap:
                return False, num_tiles, num_merges, num_slots, makespan, capacity + 1
            piece = min(cur_rem, space - overhead)
            if emit:
                _put_tiles(buf, tile_at, num_tiles, cur_request, cur_head, 1, cur_pos, cur_pos + piece, num_slots)
            num_tiles += 1
            num_slots += 1
            cur_pos += piece
            cur_rem -= piece
            remaining -= piece
            space -= piece + overhead
            if cur_rem == 0:
                cur_rem = -1
                num_merges += 1
                if emit:
                    buf[o_m_indptr + num_merges] = num_slots
        # 2. whole pairs from the long end while they fit, then 3. from the short end
        for from_long in (True, False):
            while lo <= hi:
                p = hi if from_long else lo
                request = order[last - np.uint64(p)]
                tokens = by_length[last - np.uint64(p)]
                cost = tokens + overhead
                if cost > space:
                    break
                k = left[p]
                if k * cost > space:
                    k = np.int64(space / cost)  # exact: k < left[p] and both < 2**53 (no 64-bit idiv)
                if num_tiles + k > tile_cap:
                    return False, num_tiles, num_merges, num_slots, makespan, capacity + 1
                if emit:
                    first = taken[p] if from_long else taken[p] + left[p] - k
                    if scalar_heads is None:  # compiled out: one _pack for each case
                        _put_whole_vector(buf, tile_at, num_tiles, request, first, k, tokens)
                    else:
                        _put_whole(buf, tile_at, num_tiles, request, first, k, tokens)
                if from_long:
                    taken[p] += k
                left[p] -= k
                num_tiles += k
                space -= k * cost
                remaining -= k * cost
                if left[p] > 0:
                    break
                if from_long:
                    hi -= 1
                else:
                    lo += 1
        # 4. split the longest pair to fill the gap, unless the CTAs after this one can take the rest
        if cur_rem < 0 and lo <= hi and remaining > (num_ctas - cta - 1) * (capacity - loss):
            request = order[last - np.uint64(hi)]
            tokens = by_length[last - np.uint64(hi)]
            piece = min(space - overhead, tokens - 1)
            if piece >= 1:
                if num_tiles + 1 > tile_cap or num_merges + 1 > merge_cap:
                    return False, num_tiles, num_merges, num_slots, makespan, capacity + 1
                cur_request, cur_head = request, taken[hi]
                if emit:
                    buf[o_m_request + num_merges], buf[o_m_head + num_merges] = cur_request, cur_head
                    buf[o_m_indptr + num_merges] = num_slots
                    _put_tiles(buf, tile_at, num_tiles, cur_request, cur_head, 1, 0, piece, num_slots)
                num_tiles += 1
                num_slots += 1
                cur_pos, cur_rem = piece, tokens - piece
                remaining -= piece + overhead
                space -= piece + overhead
                taken[hi] += 1
                left[hi] -= 1
                if left[hi] == 0:
                    hi -= 1
        makespan = max(makespan, capacity - space)
        if emit:
            buf[o_indptr + cta + 1] = num_tiles
    if cur_rem < 0 and lo > hi:
        return True, num_tiles, num_merges, num_slots, makespan, capacity
    lost = num_ctas * capacity - (total - remaining) + (overhead if cur_rem >= 0 else 0)
    return False, num_tiles, num_merges, num_slots, makespan, _suggest(capacity, num_ctas, lost, total, num_ctas)


@njit(cache=True, nogil=True, inline="always")
def _put_tiles(buf, at, first_tile, request, head, count, start, end, slot):
    """The plan's words of tiles first_tile .. first_tile + count - 1: one request, kv_heads head ..,
    the same tokens and slot (``at``: the tile sections' offsets, ``_tile_offsets``). A
    ``while``, which LLVM leaves scalar: its vectorized ``for`` loop, runtime alias checks and all,
    took 1.8x as long at B=4096 on the 2-core VM."""
    t, stop = np.uint64(first_tile), np.uint64(first_tile + count)
    request_at, head_at, start_at, end_at, slot_at = at
    request, head = np.int32(request), np.int32(head)
    start, end, slot = np.int32(start), np.int32(end), np.int32(slot)
    while t < stop:
        buf[request_at + t], buf[head_at + t] = request, head
        buf[start_at + t], buf[end_at + t], buf[slot_at + t] = start, end, slot
        head += np.int32(1)
        t += np.uint64(1)


@njit(cache=True, nogil=True, inline="always")
def _put_whole(buf, at, first_tile, request, head, count, tokens):
    """``_put_tiles`` of whole pairs (tokens [0, tokens), no slot) into a plan whose start and slot
    words ``_pack`` filled ahead: request, kv_head and end only."""
    t, stop = np.uint64(first_tile), np.uint64(first_tile + count)
    request_at, head_at, _, end_at, _ = at
    request, head, tokens = np.int32(request), np.int32(head), np.int32(tokens)
    while t < stop:
        buf[request_at + t], buf[head_at + t], buf[end_at + t] = request, head, tokens
        head += np.int32(1)
        t += np.uint64(1)


@njit(cache=True, nogil=True, inline="always")
def _put_whole_vector(buf, at, first_tile, request, head, count, tokens):
    """``_put_whole`` of at most VECTOR_MOST_HEADS tiles as 16-byte stores of four: one or two a
    section, no loop (what the emitting pass waited on was its stores and their loop: 9.5 -> 8.5 us
    at B=256 log-normal). Words past ``count`` -- at most layout.VECTOR_SLACK_WORDS past the capacity,
    which the layout leaves unused -- are overwritten by the next tiles or lie past the live ones."""
    t = np.uint64(first_tile)
    request_at, head_at, _, end_at, _ = at
    request, head, tokens = np.int32(request), np.int32(head), np.int32(tokens)
    store_int32x4(buf, request_at + t, request, np.int32(0))
    store_int32x4(buf, head_at + t, head, np.int32(1))
    store_int32x4(buf, end_at + t, tokens, np.int32(0))
    if count > 4:
        t += np.uint64(4)
        store_int32x4(buf, request_at + t, request, np.int32(0))
        store_int32x4(buf, head_at + t, head + np.int32(4), np.int32(1))
        store_int32x4(buf, end_at + t, tokens, np.int32(0))


@njit(cache=True, nogil=True, inline="always")
def _tile_offsets(off):
    """The five tile sections' offsets in the plan, unsigned (no negative-index wrap in the stores)."""
    return (np.uint64(off[S_REQUEST]), np.uint64(off[S_KV_HEAD]), np.uint64(off[S_START]), np.uint64(off[S_END]),
            np.uint64(off[S_SLOT]))  # fmt: skip


@njit(cache=True, nogil=True, inline="always")
def _suggest(capacity, ctas_done, lost, total, num_ctas):
    """Next capacity to try after a failed pass: the ideal plus the cost the CTAs done so far lost
    on average (gaps, split overheads, the overhead of a pending piece), which the rest would lose too."""
    per_cta = (lost + ctas_done - 1) // max(ctas_done, 1)
    estimate = (total + num_ctas - 1) // num_ctas + per_cta
    return max(capacity + 1, estimate + estimate // (2 * REFINE_RATIO))  # a margin the search tolerates


@njit(cache=True, nogil=True, inline="always")
def _capacity_range(total, batch, num_kv_heads, num_ctas):
    """(lo, hi) of the packing's capacity search: no capacity below lo fits (the even spread; a pair
    with tokens costs more than the overhead), hi always does (a CTA leaves at most
    TILE_OVERHEAD_TOKENS + 2 unused), so the packing's makespan is at most hi."""
    overhead = np.int64(TILE_OVERHEAD_TOKENS)
    even = (total + num_ctas - 1) // num_ctas
    has_tokens = total > num_kv_heads * batch * overhead
    lo = max(even, overhead + (1 if has_tokens else 0))
    return lo, max(lo, even + overhead + 2)


@njit(cache=True, nogil=True)
def _search_pack(order, by_length, num_kv_heads, num_ctas, tile_cap, merge_cap, total, below, buf, off, left, taken):
    """Smallest capacity (within 1/REFINE_RATIO) at which ``_pack`` fits, if any is below ``below``;
    its plan is written (an anchor that beats it overwrites it). Returns (found, num_tiles,
    num_merges, num_slots, makespan). ``left``, ``taken``: int64 work rows of at least B entries.

    lo is a lower bound, hi always fits (a CTA leaves at most TILE_OVERHEAD_TOKENS + 2 unused).
    After a failed pass try its estimate, after a fitting one bisect; a pass that would end the
    search if it fits records the plan as it goes."""
    batch = order.shape[0]
    left, taken = left[:batch], taken[:batch]
    lo, hi = _capacity_range(total, batch, num_kv_heads, num_ctas)
    limit = min(hi, below - 1)
    capacity = hi if (hi - lo) * REFINE_RATIO <= hi else lo  # hi is close enough: one pass
    while lo <= limit:
        capacity = min(max(capacity, lo), limit)
        final = capacity == hi or (capacity - lo) * REFINE_RATIO <= capacity
        if num_kv_heads <= VECTOR_MOST_HEADS:
            fits, num_tiles, num_merges, num_slots, makespan, suggested = _pack(
                capacity, final, order, by_length, num_kv_heads, num_ctas, tile_cap, merge_cap, total, left, taken, buf, off, None
            )
        else:
            fits, num_tiles, num_merges, num_slots, makespan, suggested = _pack(
                capacity, final, order, by_length, num_kv_heads, num_ctas, tile_cap, merge_cap, total, left, taken, buf, off,
                num_kv_heads,
            )
        if fits and final:
            return True, num_tiles, num_merges, num_slots, makespan
        if fits:
            hi = limit = capacity
            capacity = (lo + hi) // 2
        else:
            lo = capacity + 1
            capacity = suggested
    return False, 0, 0, 0, 0


@njit(cache=True, nogil=True)
def _emit_blocks(kv_len, num_kv_heads, num_ctas, chunk, groups, units, block, buf, off):
    """Write an anchor schedule kept at block level (``lpt_blocks``): block tile u on block-CTA
    ``units[u]`` stands for ``block`` tiles -- kv_heads h .. h + block - 1 of one chunk -- on CTAs
    units[u] * block + i. Tiles grouped by CTA in placement order (a CTA's tiles: its block's units
    in order), slots of split pairs as ``base[request] + kv_head * chunks + chunk_index``, one
    merge entry per split pair in request order. Returns (num_tiles, num_merges, num_slots)."""
    g_request, g_chunk0, g_chunks, g_tokens, g_count, request_chunks = groups
    batch = kv_len.shape[0]
    o_m_indptr, o_m_request, o_m_head = off[S_MERGE_INDPTR], off[S_MERGE_REQUEST], off[S_MERGE_KV_HEAD]
    num_tiles = np.int64(g_count.sum())
    # merges and slot bases, in request order
    slot_base = np.empty(batch, np.int64)
    num_slots = num_merges = np.int64(0)
    buf[o_m_indptr] = 0
    for request in range(batch):
        chunks = request_chunks[request]
        slot_base[request] = num_slots
        if chunks == 1:
            continue
        for head in range(num_kv_heads):
            num_slots += chunks
            buf[o_m_request + num_merges], buf[o_m_head + num_merges] = request, head
            buf[o_m_indptr + num_merges + 1] = num_slots
            num_merges += 1
    # block-CTA s holds units first[s] .. first[s + 1] - 1 (placement order); its CTA s * block + i
    # runs kv_head h + i of each of them, so tiles block * first[s] + i * count + k, count = its units
    num_blocks = num_ctas // block
    num_units = num_tiles // block
    first = np.zeros(num_blocks + 1, np.int64)
    for k in range(num_units):
        first[units[k] + 1] += 1
    for s in range(num_blocks):
        first[s + 1] += first[s]
    o_indptr = off[S_CTA_TILE_INDPTR]
    buf[o_indptr] = 0
    for s in range(num_blocks):
        count = first[s + 1] - first[s]
        for i in range(block):
            buf[o_indptr + s * block + i + 1] = block * first[s] + (i + 1) * count
    cursor = first[:num_blocks] * block  # the next unit's tile of kv_head h (then + i * count)
    request_at, head_at, start_at, end_at, slot_at = _tile_offsets(off)
    units_per_chunk = num_kv_heads // block
    u = np.uint64(0)
    for g in range(g_request.shape[0]):
        request, tokens, index = np.int32(g_request[g]), g_tokens[g], g_chunk0[g]
        chunks = request_chunks[request]
        split = chunks > 1
        for _ in range(g_chunks[g]):
            start = np.int32(index * chunk if split else 0)
            stop = np.int32(start + tokens)
            slot, stride = (np.int32(slot_base[request] + index), np.int32(chunks)) if split else (np.int32(-1), np.int32(0))
            head = np.int32(0)
            for _ in range(units_per_chunk):
                s = units[u]
                t = np.uint64(cursor[s])
                step = np.uint64(first[s + 1] - first[s])
                cursor[s] += 1
                last = head + np.int32(block)
                while head < last:
                    buf[request_at + t], buf[head_at + t] = request, head
                    buf[start_at + t], buf[end_at + t], buf[slot_at + t] = start, stop, slot + head * stride
                    head += np.int32(1)
                    t += step
                u += np.uint64(1)
            index += 1
    return num_tiles, num_merges, num_slots


@njit(cache=True, nogil=True)
def _best_anchor(kv_len, order, by_length, page_size, num_kv_heads, num_ctas, tile_cap, ceiling, scratch, keys):
    """The lower makespan of FlashInfer's two schedules (anchors.py), if one is below ``ceiling``:
    the more promising (lower bound) first, each skipped when its bound is not below the best so
    far. Returns (makespan, chunk, scratch row of its block-level assignment, block); makespan
    ``ceiling`` and chunk -1 when neither is below it. ``keys``: the LPT tree's work space."""
    batch = order.shape[0]
    longest = by_length[0] if batch else np.int64(0)
    chunk_a = decode_chunk_tokens(kv_len, page_size, num_kv_heads, num_ctas)
    chunk_b = persistent_chunk_tokens(kv_len, page_size, num_kv_heads, num_ctas)
    chunk_a = 0 if chunk_a >= longest else chunk_a  # a chunk no request exceeds: no split
    chunk_b = 0 if chunk_b >= longest else chunk_b
    bound_a, tiles_a = _anchor_bound(kv_len, order, num_kv_heads, num_ctas, chunk_a, longest, ceiling)
    bound_b, tiles_b = bound_a, tiles_a  # the same chunks: the same schedule, bounded once
    if chunk_b != chunk_a:
        bound_b, tiles_b = _anchor_bound(kv_len, order, num_kv_heads, num_ctas, chunk_b, longest, ceiling)
    if bound_b < bound_a:
        chunk_a, chunk_b, bound_a, bound_b, tiles_a, tiles_b = chunk_b, chunk_a, bound_b, bound_a, tiles_b, tiles_a
    best, chunk, row, block = ceiling, np.int64(-1), X_ASSIGNMENT, np.int64(1)
    if tiles_a <= tile_cap and bound_a < best:
        makespan_a, block_a = lpt_blocks(by_length, by_length[:0], num_kv_heads, num_ctas, scratch[X_ASSIGNMENT, :tiles_a], chunk_a, best, keys)
        if makespan_a < best:
            best, chunk, block = makespan_a, chunk_a, block_a
    if chunk_b != chunk_a and tiles_b <= tile_cap and bound_b < best:
        makespan_b, block_b = lpt_blocks(by_length, by_length[:0], num_kv_heads, num_ctas, scratch[X_SPARE, :tiles_b], chunk_b, best, keys)
        if makespan_b < best:
            best, chunk, row, block = makespan_b, chunk_b, X_SPARE, block_b
    return best, chunk, row, block


@njit(cache=True, nogil=True)
def _anchor_bound(kv_len, order, num_kv_heads, num_ctas, chunk, longest, best):
    """``makespan_lower_bound`` probed with ``best``, or just the costliest tile's cost (a full chunk,
    or the longest request) when that alone is not below ``best`` (no pass over the batch; the
    tile count is then 0: the anchor is skipped whatever it is)."""
    costliest = (chunk if chunk > 0 else longest) + TILE_OVERHEAD_TOKENS
    if costliest >= best:
        return costliest, np.int64(0)
    return makespan_lower_bound(kv_len, order, num_kv_heads, num_ctas, chunk, best)


def state_words(tile_capacity: int, batch_capacity: int) -> int:
    """Length of a core's int64 state array (``_state_parts``)."""
    return STATE_SCRATCH + SCRATCH_ROWS * tile_capacity + BATCH_ROWS * batch_capacity + SORT_COUNT_WORDS + TREE_KEY_WORDS


@njit(cache=True, nogil=True, inline="always")
def _state_parts(state):
    """(params, result, work) of a core's state array; work: (scratch rows, batch rows, the sort's
    digit counts, the LPT tree's uint64 keys)."""
    params = state[:P_WORDS]
    result = state[STATE_RESULT:STATE_SCRATCH]
    tile_cap, batch_cap = params[P_TILE_CAP], params[P_BATCH_CAP]
    at = STATE_SCRATCH + SCRATCH_ROWS * tile_cap
    scratch = state[STATE_SCRATCH:at].reshape((SCRATCH_ROWS, tile_cap))
    rows = state[at : at + BATCH_ROWS * batch_cap].reshape((BATCH_ROWS, batch_cap))
    at += BATCH_ROWS * batch_cap
    counts = state[at : at + SORT_COUNT_WORDS]
    keys = state[at + SORT_COUNT_WORDS : at + SORT_COUNT_WORDS + TREE_KEY_WORDS].view(np.uint64)
    return params, result, (scratch, rows, counts, keys)


@njit(cache=True, nogil=True)
def _plan_core(kv_indptr, kv_indices, kv_last_page_len, num_pages, serial, state, buf):
    """Validate, copy, schedule and write the header; the R_* words go to the state's result words.
    The page table's arrays come as ``index_input`` made them (so do the other cores')."""
    kv_indptr, kv_indices, kv_last_page_len = index_view(kv_indptr), index_view(kv_indices), index_view(kv_last_page_len)
    params, result, work = _state_parts(state)
    result[:] = 0
    off = params[P_OFFSETS:]
    if validate_page_table(kv_indptr, kv_indices, kv_last_page_len, num_pages, params[P_PAGE_SIZE], params[P_MAX_PAGE_REFS], buf, off, result):
        _schedule(kv_last_page_len.shape[0], num_pages, serial, params, buf, work, result)


@njit(cache=True, nogil=True)
def _plan_core_device(kv_indptr, kv_last_page_len, num_indices, num_pages, serial, state, buf):
    """As _plan_core for page ids that stay on the device: lengths checked, nothing copied."""
    kv_indptr, kv_last_page_len = index_view(kv_indptr), index_view(kv_last_page_len)
    params, result, work = _state_parts(state)
    result[:] = 0
    off = params[P_OFFSETS:]
    if validate_page_lengths(kv_indptr, kv_last_page_len, num_indices, params[P_PAGE_SIZE], params[P_MAX_PAGE_REFS], buf, off, result):
        _schedule(kv_last_page_len.shape[0], num_pages, serial, params, buf, work, result)


@njit(cache=True, nogil=True)
def _plan_core_blocks(seq_lens, row_stride, max_blocks, span, num_pages, serial, state, buf):
    """As _plan_core for a device block table: per-request lengths checked, nothing copied."""
    seq_lens = index_view(seq_lens)
    params, result, work = _state_parts(state)
    result[:] = 0
    off = params[P_OFFSETS:]
    if validate_block_lengths(seq_lens, row_stride, max_blocks, span, params[P_PAGE_SIZE], params[P_MAX_PAGE_REFS], buf, off, result):
        _schedule(seq_lens.shape[0], num_pages, serial, params, buf, work, result)


@njit(cache=True, nogil=True)
def _schedule(batch, num_pages, serial, params, buf, work, result):
    """Schedule the batch whose kv_len is in ``buf`` and write the header (the R_* words in ``result``).
    ``work``: ``_state_parts``' work arrays (contents ignored)."""
    scratch, rows, counts, keys = work
    off = params[P_OFFSETS:]
    page_size, num_kv_heads, num_ctas = params[P_PAGE_SIZE], params[P_KV_HEADS], params[P_NUM_CTAS]
    tile_cap, merge_cap = params[P_TILE_CAP], params[P_MERGE_CAP]
    kv_len = buf[off[S_KV_LEN] : off[S_KV_LEN] + batch]
    overhead = np.int64(TILE_OVERHEAD_TOKENS)
    kv_tokens = np.int64(0)
    for i in range(batch):
        kv_tokens += kv_len[i]
    # by_length: kv_len in order, what the anchors' LPT and the packing read
    order, by_length = sort_longest_first(kv_len, rows[Y_WORDS], rows[Y_MOVED], rows[Y_LENGTHS], counts)
    if params[P_CHUNK] > 0:
        assignment = scratch[X_ASSIGNMENT]  # deterministic: fixed chunks, longest tiles first
        groups = chunk_groups(kv_len, order, num_kv_heads, params[P_CHUNK])
        by_tokens = np.argsort(-groups[3], kind="mergesort")
        groups = (groups[0][by_tokens], groups[1][by_tokens], groups[2][by_tokens], groups[3][by_tokens], groups[4][by_tokens], groups[5])  # fmt: skip
        tiles = groups[4].sum()
        if tiles > tile_cap:
            result[R_ERROR], result[R_VALUE] = E_CAPACITY, tiles
            return
        makespan, block = lpt_blocks(groups[3], groups[2], num_kv_heads, num_ctas, assignment[:tiles], 0, NO_MAKESPAN, keys)
        num_tiles, num_merges, num_slots = _emit_blocks(kv_len, num_kv_heads, num_ctas, params[P_CHUNK], groups, assignment, block, buf, off)
    else:
        # the anchors (longest first on the least-loaded CTA) that may beat the packing -- whose
        # makespan is at most hi -- then the packing only if it beats the better of them (written
        # into the plan as it goes), else that anchor
        total = num_kv_heads * (kv_tokens + batch * overhead)
        ceiling = _capacity_range(total, batch, num_kv_heads, num_ctas)[1]
        anchor, chunk, row, block = _best_anchor(kv_len, order, by_length, page_size, num_kv_heads, num_ctas, tile_cap, ceiling, scratch, keys)
        found, num_tiles, num_merges, num_slots, makespan = _search_pack(
            order, by_length, num_kv_heads, num_ctas, tile_cap, merge_cap, total, anchor if chunk >= 0 else NO_MAKESPAN, buf, off,
            rows[Y_LEFT], rows[Y_TAKEN],
        )
        if not found:
            if chunk < 0:  # the layout's capacities hold any packing: a planner bug
                result[R_ERROR] = E_CAPACITY
                return
            makespan = anchor
            groups = chunk_groups(kv_len, order, num_kv_heads, chunk)
            num_tiles, num_merges, num_slots = _emit_blocks(kv_len, num_kv_heads, num_ctas, chunk, groups, scratch[row], block, buf, off)
    if num_tiles > tile_cap or num_merges > merge_cap or num_slots > params[P_SLOT_CAP]:
        result[R_ERROR], result[R_VALUE] = E_CAPACITY, num_tiles
        return
    header = buf[off[S_HEADER] : off[S_HEADER] + HEADER_WORDS]
    header[:] = 0
    header[H_NUM_TILES], header[H_NUM_MERGES], header[H_BATCH_SIZE] = num_tiles, num_merges, batch
    header[H_NUM_SLOTS], header[H_PLAN_SERIAL] = num_slots, serial
    header[H_NUM_PAGES] = min(num_pages, INT32_MAX)
    result[R_TILES], result[R_MERGES], result[R_SLOTS], result[R_MAKESPAN] = num_tiles, num_merges, num_slots, makespan
    result[R_KV_TOKENS] = kv_tokens


# ---- Python entry --------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _layout_params(layout: DecodeLayout) -> tuple[np.ndarray, int]:
    """The njit core's parameter words for ``layout`` and the plan length in words."""
    offsets = layout.offsets()
    chunk = DETERMINISTIC_CHUNK_TOKENS if layout.deterministic else 0
    head = [layout.page_size, layout.num_kv_heads, layout.num_ctas, layout.max_page_refs, chunk,
            layout.tile_capacity, layout.merge_capacity, layout.slot_capacity, layout.max_batch_size]  # fmt: skip
    params = np.array(head + [offsets[name][0] for name in DECODE_SECTIONS], dtype=np.int64)
    params.flags.writeable = False
    return params, layout.plan_words


_as_index_array = as_index_array  # former private name


def plan_decode(
    layout: DecodeLayout,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    num_pages: int,
    serial: int = 0,
) -> Plan:
    """Validate the page table and balance its tiles over ``layout.num_ctas`` CTAs.

    kv_indptr [B+1], kv_indices [>= kv_indptr[-1]], kv_last_page_len [B]: int32 CPU torch tensors or
    numpy arrays. A non-empty request has kv_len = (pages - 1) * page_size + last_page_len; a request
    without pages has kv_len 0 (one empty tile per kv_head). ``num_pages``: pages in the KV cache.
    Raises InputError (malformed table) or PlanError (beyond the layout's bounds) before any plan exists."""
    indptr = index_input(kv_indptr, "kv_indptr")
    indices = index_input(kv_indices, "kv_indices")
    last_page_len = index_input(kv_last_page_len, "kv_last_page_len")
    batch = index_length(last_page_len)
    check_csr_batch(layout, indptr, batch, num_pages)
    return _run_core(layout, _plan_core, (indptr, indices, last_page_len), num_pages, serial, batch, None)


def plan_decode_device(layout: DecodeLayout, kv_indptr: Any, kv_last_page_len: Any, num_indices: int, num_pages: int,
                       serial: int = 0) -> Plan:  # fmt: skip
    """``plan_decode`` for page ids that stay on the device (``num_indices`` of them, a caller-owned
    int32 tensor the kernels read): only kv_indptr and kv_last_page_len (host int32) are read and
    checked; the kernels guard each id against ``num_pages`` (kernels/page_table.py; the runtime
    lowers the bound to the pages of the cache it runs on). The plan's ``max_page_index`` is -1:
    the host knows no page id."""
    indptr = index_input(kv_indptr, "kv_indptr")
    last_page_len = index_input(kv_last_page_len, "kv_last_page_len")
    batch = index_length(last_page_len)
    check_csr_batch(layout, indptr, batch, num_pages)
    args = (indptr, last_page_len, int(num_indices))  # Python ints: numba types them faster than np.int64 (~2 us)
    return _run_core(layout, _plan_core_device, args, num_pages, serial, batch, "device")


def plan_decode_block_table(layout: DecodeLayout, seq_lens: Any, row_stride: int, max_blocks: int, span: int,
                            num_pages: int, serial: int = 0) -> Plan:  # fmt: skip
    """``plan_decode`` for a device block table: request r's page ids are ``row_stride`` apart, at
    flat index r * row_stride of a view of ``span`` ids, at most ``max_blocks`` of them; only
    ``seq_lens`` [B] (host int32 KV tokens per request) is read. Page ids are guarded on the device."""
    lengths = index_input(seq_lens, "seq_lens")
    batch = index_length(lengths)
    if batch > layout.max_batch_size:
        raise PlanError(f"batch size {batch} exceeds max_batch_size={layout.max_batch_size} (Settings)")
    if num_pages < 0:
        raise InputError(f"num_pages must be >= 0, got {num_pages}")
    args = (lengths, int(row_stride), int(max_blocks), int(span))
    return _run_core(layout, _plan_core_blocks, args, num_pages, serial, batch, "block_table")


def check_csr_batch(layout: DecodeLayout, indptr: IndexInput, batch: int, num_pages: int) -> None:
    """kv_indptr (an array or an ``index_input`` result) has B + 1 entries, B fits the layout and
    num_pages is not negative."""
    entries = index_length(indptr)
    if entries != batch + 1:
        raise InputError(f"kv_indptr must have len(kv_last_page_len) + 1 = {batch + 1} entries, got {entries}")
    if batch > layout.max_batch_size:
        raise PlanError(f"batch size {batch} exceeds max_batch_size={layout.max_batch_size} (Settings)")
    if num_pages < 0:
        raise InputError(f"num_pages must be >= 0, got {num_pages}")


_per_thread = threading.local()  # {id(layout): CoreInputs}
_PLAN_DTYPE = np.dtype(np.int32)  # a dtype object: np.empty converts the np.int32 type on every call (~0.1 us)
_MOST_LAYOUTS = 8


class CoreInputs(NamedTuple):
    """What the njit core takes for one layout's plans besides the batch, kept per thread."""

    state: np.ndarray  # int64: the layout's parameter words (_layout_params), the R_* result words, work rows
    plan_words: int
    result: np.ndarray  # the state's R_* words, as the core leaves them
    layout: DecodeLayout  # held, so its id is not reused while the entry lives
    result_words: memoryview  # ``result`` read back as Python ints (memoryview.tolist: ~0.06 us less than numpy's)


def _core_inputs(layout: DecodeLayout) -> CoreInputs:
    """This thread's ``CoreInputs`` for ``layout``: fresh megabytes of scratch on every plan came back
    from the allocator as page faults (at B=4096, ~330 a plan, more than the rest of the plan took)."""
    by_layout = getattr(_per_thread, "by_layout", None)
    if by_layout is None:
        by_layout = _per_thread.by_layout = {}
    inputs = by_layout.get(id(layout))  # not the layout's hash: a Python-level call (~0.15 us a plan)
    if inputs is None:
        if len(by_layout) >= _MOST_LAYOUTS:
            by_layout.clear()
        params, words = _layout_params(layout)
        state = np.empty(state_words(layout.tile_capacity, layout.max_batch_size), dtype=np.int64)
        state[:P_WORDS] = params
        result = state[STATE_RESULT:STATE_SCRATCH]
        inputs = by_layout[id(layout)] = CoreInputs(state, words, result, layout, memoryview(result))
    return inputs


def _run_core(layout: DecodeLayout, core: Any, args: tuple[Any, ...], num_pages: int, serial: int, batch: int,
              device_table: str | None) -> Plan:  # fmt: skip
    state, words, result, _, result_words = _core_inputs(layout)
    buffer = np.empty(words, _PLAN_DTYPE)
    core(*args, num_pages, serial, state, buffer)
    error, _, _, num_tiles, num_merges, num_slots, makespan, max_page, kv_tokens = result_words.tolist()
    if error:
        raise_plan_error(result, layout, num_pages, batch)
    if device_table is not None:
        max_page = -1  # the host read no page id
    ideal = layout.num_kv_heads * (kv_tokens + batch * TILE_OVERHEAD_TOKENS) / layout.num_ctas
    return Plan(layout, buffer, serial, batch, num_tiles, num_merges, num_slots, makespan, ideal, max_page,
                device_table or "host")  # fmt: skip
