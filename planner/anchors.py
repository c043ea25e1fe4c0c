"""The schedulers we measure ourselves against, under OUR cost model (plan.py), and the LPT assignment
they share with the planner (which keeps the better of its own packing and theirs).

Both are reimplemented from public descriptions of FlashInfer's planners (no code taken); the choices
the descriptions leave open are written down here. Both cut a request of ``kv_len`` tokens into
chunks of ``chunk`` tokens (the last one shorter; ``chunk == 0`` or a shorter request: one whole
tile; a request without tokens: one empty tile), then place the tiles -- requests longest first
(ties: lower index first), a request's chunks in token order, kv_heads innermost -- each on the
least-loaded CTA (``lpt_assign``; which of several equally loaded CTAs is taken never changes a load).

``flashinfer_decode`` (the split-KV decode scheduler): max_grid = num_ctas. If B * kv_heads >=
max_grid it does not split. Otherwise it binary-searches the smallest chunk of c pages
(c >= ceil(128 tokens / page_size)) with sum_i max(1, ceil(pages_i / c)) * kv_heads <= max_grid, so
every tile gets its own CTA and the makespan is the costliest tile. (Unsplit, its grid starts blocks
in launch order as CTAs free up; we give it the longest-first order of the usual greedy instead.)

``flashinfer_persistent`` (the persistent scheduler): chunk = the ideal per-CTA share of KV tokens,
ceil(kv_heads * total_tokens / num_ctas), rounded up to whole pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .lpt import NO_BOUND, cut_chunks, expand_blocks, lpt_assign, lpt_blocks  # noqa: F401 -- the LPT's names, here as before
from .plan import TILE_OVERHEAD_TOKENS, balance_of, ideal_makespan

MIN_CHUNK_TOKENS = 128  # the decode scheduler's smallest split chunk (rounded up to pages)


@njit(cache=True, nogil=True)
def chunk_groups(kv_len, request_order, num_kv_heads, chunk):
    """Tiles of ``chunk``-token chunks as groups of equal tiles, in placement order.

    Per group: request, first chunk, chunks in the group, tokens per tile, tiles (chunks x kv_heads);
    tile j of a group is chunk ``first + j // kv_heads`` of kv_head ``j % kv_heads``. Also the chunk
    count of every request (1: not split)."""
    batch = request_order.shape[0]
    if chunk <= 0:  # one whole tile per request: no per-request branches, fills and one gather
        g_tokens = np.empty(batch, np.int64)
        for n in range(batch):
            g_tokens[n] = kv_len[request_order[n]]
        ones = np.ones(batch, np.int64)
        return (request_order.astype(np.int64), np.zeros(batch, np.int64), ones, g_tokens,
                np.full(batch, np.int64(num_kv_heads)), ones)  # fmt: skip
    g_request = np.empty(2 * batch, np.int64)
    g_chunk0 = np.empty(2 * batch, np.int64)
    g_chunks = np.empty(2 * batch, np.int64)
    g_tokens = np.empty(2 * batch, np.int64)
    request_chunks = np.empty(batch, np.int64)
    n = 0
    for i in request_order:
        full, size, rest = cut_chunks(np.int64(kv_len[i]), chunk)  # chunk > 0 here
        g_request[n], g_chunk0[n], g_chunks[n], g_tokens[n] = i, 0, full, size
        n += 1
        if rest > 0:
            g_request[n], g_chunk0[n], g_chunks[n], g_tokens[n] = i, full, 1, rest
            n += 1
        request_chunks[i] = full + (rest > 0)
    g_count = g_chunks[:n] * num_kv_heads
    return g_request[:n], g_chunk0[:n], g_chunks[:n], g_tokens[:n], g_count, request_chunks


@njit(cache=True, nogil=True)
def decode_chunk_tokens(kv_len, page_size, num_kv_heads, num_ctas):
    """FlashInfer decode's chunk (tokens; 0: no split)."""
    batch = kv_len.shape[0]
    if batch == 0 or batch * num_kv_heads >= num_ctas:
        return np.int64(0)
    most_pages = np.int64(0)
    for i in range(batch):
        most_pages = max(most_pages, (np.int64(kv_len[i]) + page_size - 1) // page_size)
    low = (MIN_CHUNK_TOKENS + page_size - 1) // page_size
    high = max(low, most_pages)
    while low < high:
        mid = (low + high) // 2
        tiles = np.int64(0)
        for i in range(batch):
            pages = (np.int64(kv_len[i]) + page_size - 1) // page_size
            tiles += max(1, (pages + mid - 1) // mid)
        if tiles * num_kv_heads <= num_ctas:
            high = mid
        else:
            low = mid + 1
    return low * page_size


@njit(cache=True, nogil=True)
def persistent_chunk_tokens(kv_len, page_size, num_kv_heads, num_ctas):
    """FlashInfer persistent's chunk (tokens): the per-CTA share, in whole pages."""
    total = np.int64(0)
    for i in range(kv_len.shape[0]):
        total += kv_len[i]
    share = (num_kv_heads * total + num_ctas - 1) // num_ctas
    return page_size * max(1, (share + page_size - 1) // page_size)


RADIX_BITS = 11  # the request sort's widest digit (a batch of B uses about log2(B) bits, 4 at least)


@njit(cache=True, nogil=True)
def longest_first(kv_len):
    """Request indices by kv_len, longest first, ties by index (``longest_first_lengths``' order)."""
    return longest_first_lengths(kv_len)[0]


#: ``sort_longest_first``'s digit counts: two histograms of at most 2**RADIX_BITS + 1 entries
SORT_COUNT_WORDS = 2 * ((1 << RADIX_BITS) + 1)


@njit(cache=True, nogil=True)
def longest_first_lengths(kv_len):
    """(order, kv_len in that order as int64): request indices by kv_len, longest first, ties by
    index (``sort_longest_first`` into fresh arrays)."""
    batch = kv_len.shape[0]
    return sort_longest_first(kv_len, np.empty(batch, np.int64), np.empty(batch, np.int64), np.empty(batch, np.int64),
                              np.empty(SORT_COUNT_WORDS, np.int64))  # fmt: skip


@njit(cache=True, nogil=True)
def sort_longest_first(kv_len, words, moved, lengths, counts):
    """``longest_first_lengths`` in the caller's int64 work arrays (``words``, ``moved``, ``lengths``:
    at least B entries; ``counts``: SORT_COUNT_WORDS): returns views of two of them (the planner's
    hot path allocates nothing). A stable LSD radix sort of ``longest - kv_len`` over the bits that
    differ between keys (none for equal lengths; 6 for a 32k request among 512s), in as few passes
    of at most about log2(batch) bits (4 to RADIX_BITS) as they need. Each key travels with its
    index in one word (key << 32 | index): the passes read and move words, with no gather of the
    key by index, and the sorted lengths come back out of the keys."""
    batch = kv_len.shape[0]
    words, moved, lengths = words[:batch], moved[:batch], lengths[:batch]
    longest = np.int64(0)
    for i in range(batch):
        longest = max(longest, np.int64(kv_len[i]))
    spread = np.int64(0)
    common = np.int64(-1)
    for i in range(batch):
        key = longest - np.int64(kv_len[i])  # < 2**31: the word's high half
        words[i] = (key << 32) | i
        spread |= key
        common &= key
    varying = spread ^ common if batch > 0 else np.int64(0)  # bits that differ: the others cannot order keys
    if varying == 0:  # all lengths equal: index order
        for i in range(batch):
            moved[i], lengths[i] = i, longest
        return moved, lengths
    widest = np.int64(4)
    while widest < RADIX_BITS and (np.int64(1) << widest) < batch:
        widest += 1
    shift = np.int64(0)
    while (varying >> shift) & 1 == 0:
        shift += 1
    span = np.int64(0)
    while (varying >> (shift + span)) != 0:
        span += 1
    passes = (span + widest - 1) // widest
    bits = (span + passes - 1) // passes
    digits = np.int64(1) << bits
    mask = digits - 1
    end = shift + span
    while shift < end:
        at_bit = shift + 32
        # counts in two histograms (even and odd positions: equal digits do not chain one counter),
        # then a scatter that keeps the current digit's position in a register while digits repeat
        start, other = counts[: digits + 1], counts[digits + 1 : 2 * digits + 2]
        start[:] = 0
        other[:] = 0
        for i in range(0, batch - 1, 2):
            start[((words[i] >> at_bit) & mask) + 1] += 1
            other[((words[i + 1] >> at_bit) & mask) + 1] += 1
        if batch % 2:
            start[((words[batch - 1] >> at_bit) & mask) + 1] += 1
        for d in range(digits):
            start[d + 1] += start[d] + other[d + 1]
        last, at = np.int64(-1), np.int64(0)
        for i in range(batch):
            word = words[i]
            d = (word >> at_bit) & mask
            if d != last:
                if last >= 0:
                    start[last] = at
                last, at = d, start[d]
            moved[at] = word
            at += 1
        words, moved = moved, words
        shift += bits
    order = moved  # the spare array
    for i in range(batch):
        word = words[i]
        order[i] = word & 0xFFFFFFFF
        lengths[i] = longest - (word >> 32)
    return order, lengths


@njit(cache=True, nogil=True)
def makespan_lower_bound(kv_len, order, num_kv_heads, num_ctas, chunk, probe=0):
    """(lower bound on the makespan, tiles) of ANY schedule of ``chunk``-token chunks.

    The tiles as a stream, costliest class first: the full chunks, then each request's last or only
    tile in ``order`` (longest request first). Three bounds: the total cost spread evenly; pigeonhole,
    n tiles that each cost at least c put ceil(n / num_ctas) of them on one CTA (n: a prefix of the
    stream, c: its smallest cost); and big-and-small: the first ``big`` tiles (the full chunks, or
    the longest request's) each cost at least cb, the next s at least cs -- under a makespan below
    cb + cs no CTA holding a big tile holds another of them, so the s tiles share the other
    num_ctas - big CTAs, ceil(s / (num_ctas - big)) on one. With a ``probe`` above all three, a
    fourth test (``_might_fit``) may show that no schedule keeps every load below ``probe``: then the
    bound is ``probe`` (the planner probes with its own makespan, to skip an anchor that cannot win).

    The split requests (longer than ``chunk``) lead ``order`` and are stepped one by one; after them
    tile costs never rise, so each ceil term peaks where its quotient steps up (``_level_peaks``):
    about B * num_kv_heads / num_ctas steps, not B."""
    overhead = np.int64(TILE_OVERHEAD_TOKENS)
    batch = order.shape[0]
    longer = chunk if chunk > 0 else NO_BOUND  # requests longer than this are split
    total = num_split = np.int64(0)
    for i in range(kv_len.shape[0]):
        length = np.int64(kv_len[i])
        total += length
        num_split += length > longer
    total += overhead * (batch - num_split)
    full_tiles = np.int64(0)
    for n in range(num_split):
        length = np.int64(kv_len[order[n]])
        total += overhead * ((length + chunk - 1) // chunk)
        full_tiles += length // chunk
    full_tiles *= num_kv_heads
    bound = (num_kv_heads * total + num_ctas - 1) // num_ctas
    if batch == 0:
        return bound, np.int64(0)
    cheapest = chunk + overhead if chunk > 0 else NO_BOUND  # no other tile costs more than a full chunk
    if full_tiles > 0:
        bound = max(bound, ((full_tiles - 1) // num_ctas + 1) * cheapest)
    big, big_cost, small_cost = full_tiles, cheapest, NO_BOUND
    counted = full_tiles
    # ceil(counted / num_ctas) and ceil((counted - big) / (num_ctas - big)) kept as quotient and
    # remainder of counted - 1 (resp. counted - big - 1), stepped without a division per request
    most, over = (counted - 1) // num_ctas, (counted - 1) % num_ctas
    rest_share = rest_most = rest_over = np.int64(0)  # set at the first small tile
    for n in range(num_split):  # the split requests' last tiles (none where the chunk divides them)
        last = np.int64(kv_len[order[n]]) % chunk
        if last == 0:
            continue
        counted += num_kv_heads
        over += num_kv_heads
        while over >= num_ctas:
            over -= num_ctas
            most += 1
        cost = last + overhead
        cheapest = min(cheapest, cost)
        bound = max(bound, (most + 1) * cheapest)
        small_cost = min(small_cost, cost)
        if big < num_ctas:
            if rest_share == 0:
                rest_share = num_ctas - big
                rest_most, rest_over = (counted - big - 1) // rest_share, (counted - big - 1) % rest_share
            else:
                rest_over += num_kv_heads
                while rest_over >= rest_share:
                    rest_over -= rest_share
                    rest_most += 1
            bound = max(bound, min(big_cost + small_cost, (rest_most + 1) * small_cost))
    heads = np.int64(num_kv_heads)
    if num_split < batch:  # the unsplit requests, one tile a kv_head each
        bound = max(bound, _level_peaks(kv_len, order, num_split, counted, num_ctas, heads, NO_BOUND, cheapest))
        first = num_split
        if big == 0:  # no full chunks: the longest request's tiles are the big ones
            big, big_cost = heads, np.int64(kv_len[order[0]]) + overhead
            first = 1
        if big < num_ctas:
            small = counted + heads * (first - num_split) - big  # small tiles before request ``first``
            bound = max(bound, _level_peaks(kv_len, order, first, small, num_ctas - big, heads, big_cost, small_cost))
        if first < batch:
            small_cost = min(small_cost, np.int64(kv_len[order[batch - 1]]) + overhead)
        counted += heads * (batch - num_split)
    if probe > bound and not _might_fit(big, big_cost, counted - big, small_cost, num_ctas, probe - 1):
        bound = probe
    return bound, counted


@njit(cache=True, nogil=True, inline="always")
def _level_peaks(kv_len, order, first, counted, width, heads, cap, clamp):
    """max over the requests order[i], i >= first, of min(cap + c, (q + 1) * c), where c is the
    request's tile cost (at most ``clamp``) and q = (counted + heads * (i - first + 1) - 1) // width
    -- ``counted`` tiles before request ``first``, ``heads`` each. Costs never rise (``order``), so
    within a value of q the first request peaks: one step per value (level L > the first's starts
    at i = first + (L * width - counted) // heads; the quotient is stepped, not divided)."""
    overhead = np.int64(TILE_OVERHEAD_TOKENS)
    batch = order.shape[0]
    if first >= batch:
        return np.int64(0)
    level = (counted + heads - 1) // width
    cost = min(clamp, np.int64(kv_len[order[first]]) + overhead)
    peak = min(cap + cost, (level + 1) * cost)
    level += 1
    start = level * width - counted  # >= 0: level ``level`` starts at request first + start // heads
    index, rem = first + start // heads, start % heads
    step, carry = width // heads, width % heads
    while index < batch:
        cost = min(clamp, np.int64(kv_len[order[index]]) + overhead)
        peak = max(peak, min(cap + cost, (level + 1) * cost))
        level += 1
        index += step
        rem += carry
        if rem >= heads:
            rem -= heads
            index += 1
    return peak


#: _might_fit examines CTAs holding up to this many big tiles (beyond it, it does not decide)
MOST_BIG_PER_CTA = 64


@njit(cache=True, nogil=True)
def _might_fit(big, big_cost, small, small_cost, num_ctas, makespan):
    """False when no schedule of ``big`` tiles costing at least ``big_cost`` and ``small`` tiles
    costing at least ``small_cost`` (<= big_cost) keeps every CTA's load <= ``makespan``.

    A CTA holding j big tiles holds at most h(j) = j + (makespan - j * big_cost) // small_cost tiles,
    h(0) - h(j) = loss(j) >= 0 of them fewer than an empty-handed one. The CTAs together hold at most
    num_ctas * h(0) minus the least total loss of spreading ``big`` tiles, which is at least
    big * min_j loss(j) / j (j from 1 to makespan // big_cost)."""
    if small == 0 or small_cost >= NO_BOUND or big == 0:
        return True  # the other bounds cover these
    most_big = makespan // big_cost
    if most_big == 0:
        return False
    if most_big > MOST_BIG_PER_CTA:
        return True
    holds = makespan // small_cost
    least_loss = np.int64(NO_BOUND)
    for j in range(1, most_big + 1):
        loss = holds - (j + (makespan - j * big_cost) // small_cost)
        least_loss = min(least_loss, (big * loss + j - 1) // j)
    return num_ctas * holds - least_loss >= big + small


@njit(cache=True, nogil=True)
def _anchor_makespan(kv_len, num_kv_heads, num_ctas, chunk):
    """(makespan, tiles, lower bound) of the anchor schedule cutting ``chunk``-token chunks."""
    order = longest_first(kv_len)
    groups = chunk_groups(kv_len, order, num_kv_heads, chunk)
    tiles = np.int64(groups[4].sum())
    bound, _ = makespan_lower_bound(kv_len, order, num_kv_heads, num_ctas, chunk)
    return lpt_assign(groups[3], groups[2], num_kv_heads, num_ctas, np.empty(0, np.int64)), tiles, bound


@dataclass(frozen=True)
class AnchorSchedule:
    name: str
    makespan: int  # largest CTA load, in cost units
    num_tiles: int
    chunk_tokens: int | None  # chunk length (None: no request was split)
    balance: float  # ideal / makespan, ideal as in plan.py
    lower_bound: int  # makespan_lower_bound: no schedule of these tiles does better


def _schedule(name: str, kv_len: np.ndarray, num_kv_heads: int, num_ctas: int, chunk: int) -> AnchorSchedule:
    lengths = np.ascontiguousarray(kv_len, dtype=np.int64)
    makespan, tiles, bound = _anchor_makespan(lengths, num_kv_heads, num_ctas, chunk)
    split = chunk > 0 and bool((lengths > chunk).any())
    ideal = ideal_makespan(lengths, num_kv_heads, num_ctas)
    return AnchorSchedule(name, int(makespan), int(tiles), chunk if split else None, balance_of(ideal, int(makespan)), int(bound))


def flashinfer_decode(kv_len: np.ndarray, page_size: int, num_kv_heads: int, num_ctas: int) -> AnchorSchedule:
    lengths = np.ascontiguousarray(kv_len, dtype=np.int64)
    chunk = int(decode_chunk_tokens(lengths, page_size, num_kv_heads, num_ctas))
    return _schedule("flashinfer-decode", lengths, num_kv_heads, num_ctas, chunk)


def flashinfer_persistent(kv_len: np.ndarray, page_size: int, num_kv_heads: int, num_ctas: int) -> AnchorSchedule:
    lengths = np.ascontiguousarray(kv_len, dtype=np.int64)
    chunk = int(persistent_chunk_tokens(lengths, page_size, num_kv_heads, num_ctas))
    return _schedule("flashinfer-persistent", lengths, num_kv_heads, num_ctas, chunk)


def anchors(kv_len: np.ndarray, page_size: int, num_kv_heads: int, num_ctas: int) -> list[AnchorSchedule]:
    """Both anchors for one batch."""
    return [
        flashinfer_decode(kv_len, page_size, num_kv_heads, num_ctas),
        flashinfer_persistent(kv_len, page_size, num_kv_heads, num_ctas),
    ]
