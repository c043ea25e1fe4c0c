"""Longest-processing-time-first placement: tiles, in the order given, each on the least-loaded CTA
-- the assignment FlashInfer's schedulers share (anchors.py), which the planner also runs to keep
the better of its own packing and theirs (decode.py).

``lpt_assign`` places tiles; ``lpt_blocks`` places them on gcd(kv_heads, num_ctas)-CTA blocks (the
same schedule, b times less work) with one of two least-loaded lookups: a winner tree
(``_lpt_tree``, up to TREE_MOST_CTAS block-CTAs) or a bucket queue with batched placement
(``_lpt_buckets``, beyond). Which of several equally loaded CTAs takes a tile never changes a
load, so both give the same loads and makespan."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

from .plan import TILE_OVERHEAD_TOKENS

NO_BOUND = 1 << 62
#: block-CTAs up to which the winner tree finds the least-loaded (log2 levels a tile); beyond, the bucket queue
TREE_MOST_CTAS = 128
#: the winner tree's nodes at most: two per leaf, leaves the power of two at or above TREE_MOST_CTAS
TREE_KEY_WORDS = 4 * TREE_MOST_CTAS


@intrinsic
def _lowest_bit(typingctx, word):
    """Index of the lowest set bit of a non-zero uint64 (LLVM's cttz: one instruction)."""
    signature = types.uint64(types.uint64)

    def codegen(context, builder, sig, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return signature, codegen




@njit(cache=True, nogil=True)
def lpt_assign(g_tokens, g_chunks, num_kv_heads, num_ctas, assignment):
    """Place tiles, group by group in order, each on the least-loaded CTA; return the makespan.
    Group g is ``g_chunks[g] * num_kv_heads`` tiles of ``g_tokens[g]`` tokens (chunk_groups).

    Writes each tile's CTA into ``assignment`` (tiles in placement order) unless it is empty.

    CTAs move in blocks: with b = gcd(num_kv_heads, num_ctas), the CTAs b*s .. b*s + b - 1 always
    carry equal loads. (True at the start; a group of n = b*u equal tiles goes to the n smallest
    slots of the CTAs' load progressions, and where every load comes b times, so does every slot
    value, so the n smallest take whole blocks' worth.) So the schedule is the one of num_ctas / b
    block-CTAs and groups of n / b tiles, each block tile standing for b real tiles on the block's
    b CTAs in turn: b times less work."""
    makespan, block = lpt_blocks(g_tokens, g_chunks, num_kv_heads, num_ctas, assignment)
    expand_blocks(assignment, block)
    return makespan


@njit(cache=True, nogil=True)
def lpt_blocks(g_tokens, g_chunks, num_kv_heads, num_ctas, units, chunk=0, ceiling=NO_BOUND, keys=None):
    """``lpt_assign`` at block level (``g_chunks`` empty: one chunk a group): returns (makespan, b)
    and writes each block tile's block-CTA into ``units[: tiles // b]`` (unless ``units`` is
    empty); ``expand_blocks`` makes it per tile.

    ``chunk`` > 0: ``g_tokens`` are request lengths in placement order (``g_chunks`` empty), cut
    into ``chunk``-token chunks as it goes -- the groups ``chunk_groups`` would make, none built.
    ``ceiling``: stop once the makespan reaches it (then returned, at least ``ceiling``; ``units``
    is then incomplete) -- for a caller that only keeps a schedule below it. ``keys``: uint64 work
    space for the winner tree (TREE_KEY_WORDS entries; None: allocated here)."""
    block, other = np.int64(num_ctas), np.int64(num_kv_heads)
    while other:
        block, other = other, block % other
    block = max(block, np.int64(1))
    record = units[: units.shape[0] // block]
    machines, tiles_per_chunk = num_ctas // block, num_kv_heads // block
    if machines <= TREE_MOST_CTAS:
        space = np.empty(TREE_KEY_WORDS, np.uint64) if keys is None else keys
        return _lpt_tree(g_tokens, g_chunks, chunk, ceiling, tiles_per_chunk, machines, record, space), block
    return _lpt_buckets(g_tokens, g_chunks, chunk, ceiling, tiles_per_chunk, machines, record), block


@njit(cache=True, nogil=True)
def expand_blocks(assignment, block):
    """Block tile u on block-CTA s (``assignment[u]``, u < len // block) -> tiles u*block + i on
    CTAs s*block + i, in place (last unit first: u * block >= u)."""
    if block == 1:
        return
    for u in range(assignment.shape[0] // block - 1, -1, -1):
        first = assignment[u] * block
        for i in range(block - 1, -1, -1):
            assignment[u * block + i] = first + i


@njit(cache=True, nogil=True)
def _lpt_buckets(g_tokens, g_chunks, chunk, ceiling, tiles_per_chunk, num_ctas, assignment):
    """``lpt_assign`` on (block-)CTAs, group g being ``g_chunks[g] * tiles_per_chunk`` tiles (one
    chunk each when ``g_chunks`` is empty; ``chunk`` and ``ceiling`` as in ``lpt_blocks``). Loads
    live in a bucket queue: every load lies within one tile cost of the smallest, so a circular
    array of buckets (one per load value) with a bitmap of non-empty ones finds the least-loaded
    CTA in O(1). Tiles are placed in batches: the least-loaded CTAs in load order, the j-th taking
    the stream's next tile while its load is at most the first one's plus that tile's cost and
    costs do not rise -- then tile after tile would pick it too (every CTA given a tile before it
    is then loaded at least that much; ties between equal loads do not change any load) -- and
    given their tiles after."""
    overhead = np.int64(TILE_OVERHEAD_TOKENS)
    num_groups = g_tokens.shape[0]
    longer = chunk if chunk > 0 else NO_BOUND  # a group of more tokens is a request cut into chunks
    largest = overhead
    for g in range(num_groups):
        largest = max(largest, min(g_tokens[g], longer) + overhead)
    width = np.int64(64)
    while width <= largest:
        width *= 2
    mask, words = np.uint64(width - 1), np.uint64(width // 64)
    nonempty = np.zeros(words, np.uint64)
    bucket_head = np.empty(width, np.int32)  # read only where ``nonempty`` says so
    next_cta = np.empty(num_ctas, np.int32)
    for cta in range(num_ctas):  # all at load 0
        next_cta[cta] = cta + 1 if cta + 1 < num_ctas else -1
    bucket_head[0] = 0
    nonempty[0] = np.uint64(1)
    taken_cta = np.empty(num_ctas, np.uint64)
    taken_load = np.empty(num_ctas, np.int64)
    least = np.int64(0)  # no load is smaller (the scan for the least load starts here)
    makespan = np.int64(0)
    record = assignment.shape[0] > 0
    tile = np.uint64(0)
    # unsigned indices throughout: no negative-index wrap on the hot loads and stores (~15%)
    one, six, full = np.uint64(1), np.uint64(6), np.uint64(0xFFFFFFFFFFFFFFFF)
    g = 0
    whole = g_chunks.shape[0] == 0  # no chunk counts: one chunk a group
    rest = np.int64(0)  # tokens of the cut request's last, shorter chunk, still to come (0: none)
    todo = np.int64(0)
    cost = overhead
    if num_groups > 0:
        todo, cost, rest = _group(g_tokens, g_chunks, whole, longer, tiles_per_chunk, 0)
    while g < num_groups:
        # a batch: take the least-loaded CTAs while the next tile may go to them, then place
        batch = 0
        base = np.int64(0)
        rising = False
        while batch < num_ctas and g < num_groups:
            bucket = np.uint64(least) & mask
            word_index = bucket >> six
            word = nonempty[word_index] & (full << (bucket & np.uint64(63)))
            while word == 0:
                word_index = (word_index + one) & (words - one)
                word = nonempty[word_index]
            found = (word_index << six) + _lowest_bit(word)
            load = least + np.int64((found - bucket) & mask)
            if batch == 0:
                base = load
            elif load > base + cost:
                break
            least = load
            cta = bucket_head[found]
            while cta >= 0 and batch < num_ctas and load <= base + cost:
                taken_cta[batch], taken_load[batch] = np.uint64(cta), load + cost
                batch += 1
                cta = next_cta[np.uint64(cta)]
                todo -= 1
                if todo == 0:
                    previous = cost
                    if rest > 0:
                        todo, cost, rest = tiles_per_chunk, rest + overhead, np.int64(0)
                    else:
                        g += 1
                        if g == num_groups:
                            break
                        todo, cost, rest = _group(g_tokens, g_chunks, whole, longer, tiles_per_chunk, g)
                    rising = cost > previous  # the argument needs costs that do not rise
                    if rising:
                        break
            bucket_head[found] = cta
            if cta < 0:
                nonempty[word_index] &= ~(one << (found & np.uint64(63)))
            if rising or (cta >= 0 and batch < num_ctas and g < num_groups):
                break  # a rising cost, or the bucket's next CTA is too loaded for the next tile
        for b in range(batch):
            cta = taken_cta[b]
            load = taken_load[b]
            makespan = max(makespan, load)
            target = np.uint64(load) & mask
            bit = one << (target & np.uint64(63))
            next_cta[cta] = bucket_head[target] if nonempty[target >> six] & bit else -1
            nonempty[target >> six] |= bit
            bucket_head[target] = np.int32(cta)
            if record:
                assignment[tile] = np.int64(cta)
            tile += one
        if makespan >= ceiling:
            break
    return makespan


@njit(cache=True, nogil=True)
def _lpt_tree(g_tokens, g_chunks, chunk, ceiling, tiles_per_chunk, num_ctas, assignment, key):
    """``_lpt_buckets``' schedule (the same loads; equal loads go to the lowest CTA) from a winner
    tree, for few (block-)CTAs: each CTA's key ``load << bits | cta`` is a leaf of a binary tree
    over a power of two of leaves, each node the least key below it. A tile takes the root's CTA,
    whose leaf-to-root path is then replayed: one sibling read and a minimum per level, no branch
    (1.6 against 2.6 us an anchor at B=256 on 33 block-CTAs; beyond about 128 the bucket queue's
    batches win). Keys stay below 2**53: a CTA is least loaded when it takes a tile, so no load
    exceeds the mean plus one tile, and 2**bits < 2 * num_ctas. ``key``: at least 2 * leaves words."""
    overhead = np.int64(TILE_OVERHEAD_TOKENS)
    num_groups = g_tokens.shape[0]
    longer = chunk if chunk > 0 else NO_BOUND
    leaves, bits = np.uint64(1), np.uint64(0)
    while leaves < num_ctas:
        leaves, bits = leaves << np.uint64(1), bits + np.uint64(1)
    one = np.uint64(1)
    low = (one << bits) - one  # a key's CTA bits
    # key[n]: node n's key; its children are 2n and 2n + 1, the leaves from ``leaves`` on
    for leaf in range(leaves):
        key[leaves + np.uint64(leaf)] = np.uint64(leaf) if leaf < num_ctas else np.uint64(0xFFFFFFFFFFFFFFFF)
    for node in range(leaves - one, 0, -1):
        key[node] = min(key[2 * node], key[2 * node + 1])
    root = key[1]  # kept in a register: the last path's minimum
    record = assignment.shape[0] > 0
    whole = g_chunks.shape[0] == 0
    most = np.uint64(0)  # the largest key placed: the makespan in its high bits
    tile = np.uint64(0)
    for g in range(num_groups):
        tokens = np.int64(g_tokens[g])
        if whole and tokens <= longer:  # one chunk (most groups): a fixed count of equal tiles, no cut
            step = np.uint64(tokens + overhead) << bits
            for _ in range(tiles_per_chunk):
                placed, root = _tree_place(key, root, step, leaves, bits)
                most = max(most, placed)
                if record:
                    assignment[tile] = np.int64(placed & low)
                tile += one
        else:
            todo, cost, rest = _group(g_tokens, g_chunks, whole, longer, tiles_per_chunk, g)
            step = np.uint64(cost) << bits
            while todo > 0:
                placed, root = _tree_place(key, root, step, leaves, bits)
                most = max(most, placed)
                if record:
                    assignment[tile] = np.int64(placed & low)
                tile += one
                todo -= 1
                if todo == 0 and rest > 0:  # a cut request's shorter last chunk follows its full ones
                    todo, cost, rest = tiles_per_chunk, rest + overhead, np.int64(0)
                    step = np.uint64(cost) << bits
        if np.int64(most >> bits) >= ceiling:
            break
    return np.int64(most >> bits)


@njit(cache=True, nogil=True, inline="always")
def _tree_place(key, root, step, leaves, bits):
    """A tile costing ``step >> bits`` on the root's CTA: returns (that CTA's key after it, the new
    root) -- the CTA's leaf-to-root path replayed, a sibling read and a minimum per level."""
    one = np.uint64(1)
    placed = root + step
    best = placed
    node = leaves + (placed & ((one << bits) - one))
    for _ in range(bits):
        key[node] = best
        best = min(best, key[node ^ one])
        node >>= one
    return placed, best


@njit(cache=True, nogil=True, inline="always")
def _group(g_tokens, g_chunks, whole, longer, tiles_per_chunk, g):
    """(tiles, tile cost, tokens of a last chunk to follow) of group g: a request longer than
    ``longer`` (the chunk) as its full chunks, the rest after them (chunk_groups' order)."""
    tokens = np.int64(g_tokens[g])
    chunks = np.int64(1) if whole else np.int64(g_chunks[g])
    rest = np.int64(0)
    if tokens > longer:
        chunks, tokens, rest = cut_chunks(tokens, longer)
    return chunks * tiles_per_chunk, tokens + np.int64(TILE_OVERHEAD_TOKENS), rest


@njit(cache=True, nogil=True, inline="always")
def cut_chunks(length, longer):
    """(full chunks, tokens each, tokens of a shorter last chunk or 0) of a request of ``length``
    tokens cut into ``longer``-token chunks when longer than that (else one whole chunk): what
    ``chunk_groups`` builds and the anchors' LPT cuts as it goes."""
    if length > longer:
        return length // longer, longer, length % longer
    return np.int64(1), length, np.int64(0)
