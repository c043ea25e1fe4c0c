"""Split-KV paged decode as a cp.async pipeline: K/V tiles staged in shared memory once per stage
and read by every query head of the GQA group.

Thread block (BDX, HEADS, ROWS): BDX lanes (a power of two <= 32) split head_dim into 8-element
vectors; each y row is one query head of the group (HEADS = min(group, per-pass limit); larger
groups take several passes over the tile); the ROWS z rows split a stage's tokens, TPR each. A
stage is T = ROWS * TPR tokens of K and of V, copied global -> shared by ``cp.async`` (16 bytes per
copy, spread over every thread, zero-filled past the tile's end) into one of STAGES buffers; K and
V are separate commit groups, so the next stages' K tiles are in flight while P.V runs and the next
V tiles while Q.K runs (``wait_group 2*STAGES-1`` before each use).

Page offsets of a whole stage are computed before its copies are issued, into shared memory: the
page's index by shift/mask (power-of-two page_size) or a precomputed multiply-shift division
(``page_divisor``; no 64-bit division anywhere), the page id from kv_indices (int32), its base word
offset in int64 (pools above 2^31 elements), the token/head offset inside the page in int32.
The offsets live in 2 * STAGES slots (stage s in slot s % (2 * STAGES)), so a stage's offsets are
still there while its scores are made: a token whose page id the guard refused (offset -1,
kernels/page_table.py) reads nothing and is masked like a position past the tile's end.
Softmax max/rescale once per stage and thread, not per token. Rows are combined through shared
memory at the end of a tile; every LSE written is a natural log.

NaN: a NaN in q/k/v reaches every output row whose softmax includes it (the running max propagates
NaN explicitly); masked, out-of-range, refused-page and zero-filled tail positions are SELECTED out
(never multiplied by a zero weight).

The kernel contract is the one of ``kernels.decode`` (same plan sections, outputs, split partials
with slots, sinks for unsplit tiles, softmax-free variants, every AttentionHooks position), plus
two launch arguments: ``page_div_magic`` and ``page_div_shift`` from ``page_divisor(page_size)``.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from numba import float32, int32, int64, uint32

from tilegraph._device import SIMULATOR, cuda
from tilegraph.planner.layout import H_NUM_PAGES, H_NUM_TILES

from . import primitives as prim
from .args import ATTENTION_KV_OUT_ARGS, I32, KernelArgs
from .hooks import DEFAULT_HOOKS, DTYPE_NAMES, LN2, LOG2E, NEG_INF, AttentionHooks
from .hooks import identity_logit as _identity_logit
from .hooks import identity_pair as _identity_pair
from .hooks import identity_vec as _identity_vec
from .hooks import no_mask as _no_mask
from .hooks import no_sink as _no_sink
from .nan import NAN_PTX, fastmath_flags
from .page_table import guarded_page
from .tuning import DecodePipelineShape, decode_ctas_per_sm, decode_pipeline_shape

if TYPE_CHECKING:
    from .compile_spec import CompileSpec

DECODE_PIPELINE_ARGS = KernelArgs("decode_pipeline", (
    ("header", I32), ("cta_tile_indptr", I32), ("tile_request", I32), ("tile_kv_head", I32),
    ("tile_token_start", I32), ("tile_token_end", I32), ("tile_slot", I32),
    ("kv_indptr", I32), ("kv_indices", I32), ("kv_len", I32),
    ("q_words", I32), ("q_stride_b", "int64"), ("q_stride_h", "int64"),
    *ATTENTION_KV_OUT_ARGS,
    ("page_div_magic", "int64"), ("page_div_shift", "int64"),
))  # fmt: skip

#: largest token index a division must handle (kv lengths are int32)
MAX_TOKEN = 2**31 - 1


def page_divisor(page_size: int) -> tuple[int, int]:
    """(magic, shift) for ``t // page_size`` without a division, exact for 0 <= t < 2^31.

    Power of two: magic 0, ``t >> shift`` (and ``t & (page_size - 1)``). Otherwise
    ``(t * magic) >> shift`` in 64-bit with shift = 31 + ceil(log2 page_size) and
    magic = ceil(2^shift / page_size) < 2^32: the error magic * page_size - 2^shift < page_size,
    so t * error < 2^shift and the floor is exact; t * magic < 2^63."""
    if page_size < 1 or page_size > MAX_TOKEN:
        raise ValueError(f"page_size {page_size} outside [1, 2^31)")
    if page_size & (page_size - 1) == 0:
        return 0, page_size.bit_length() - 1
    shift = 31 + (page_size - 1).bit_length()
    return -(-(1 << shift) // page_size), shift


@cuda.jit(device=True, inline="always")
def paged_word_offset(t, page_base, kv_indices, page_size, magic, shift, page_stride, token_stride, head_offset,
                      header, request):  # fmt: skip
    """Word offset of token ``t`` (< 2^31) of a request whose pages start at kv_indices[page_base]:
    the page id (int32) times page_stride in int64, plus the int32 offset inside the page
    (token_in_page * token_stride + head_offset); ``(magic, shift)`` from page_divisor(page_size).
    -1 when the page id is outside the pool (kernels/page_table.py; the token is then masked)."""
    if magic == 0:
        page_index = int32(t >> shift)
        in_page = int32(t & (page_size - 1))
    else:
        page_index = int32((int64(t) * magic) >> shift)
        in_page = int32(t - page_index * page_size)
    page = guarded_page(kv_indices, page_base + page_index, header[H_NUM_PAGES], header, request)
    if page < 0:
        return int64(-1)
    return page * page_stride + int64(int32(in_page * token_stride) + head_offset)


@dataclass(frozen=True)
class DecodePipelineConfig:
    """One compiled specialization of the pipelined decode kernel."""

    kind: int  # primitives.F16 / BF16 / F32
    head_dim: int
    group: int
    shape: DecodePipelineShape
    hooks: AttentionHooks = DEFAULT_HOOKS

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.shape.lanes, self.shape.heads, self.shape.rows)

    @property
    def stage_tokens(self) -> int:
        return self.shape.rows * self.shape.tokens_per_row

    @property
    def threads(self) -> int:
        return self.shape.lanes * self.shape.heads * self.shape.rows

    def shared_bytes(self) -> int:
        """Static shared memory of the kernel, an upper estimate: the arrays make_decode_pipeline_kernel
        declares plus 1 KB for their alignment (nvJitLink reports 0.3-1 KB above the bare sum)."""
        sh = self.shape
        heads, t = sh.heads_per_pass, self.stage_tokens
        row_words = (self.head_dim // 8) * prim.words_per_row8(self.kind)
        tile_words = sh.stages * t * row_words
        combine = heads * sh.rows * self.head_dim
        groups, scores = sh.heads * sh.rows, sh.heads_per_thread * sh.tokens_per_row
        words = 2 * tile_words + (1 if combine <= tile_words else combine)  # K, V, the combine (1 word when in K)
        words += groups * scores * sh.lanes + groups * (scores + sh.heads_per_thread) + 3 * groups * scores
        return 4 * words + 16 * sh.stages * t + 1024  # + the int64 page offsets (2 * stages slots), alignment

    def ctas_per_sm(self) -> int:
        """Default persistent CTAs per SM (kernels.tuning.decode_ctas_per_sm of this config)."""
        return decode_ctas_per_sm(self.threads, self.shared_bytes())


def pipeline_config(kind: int, head_dim: int, group: int, hooks: AttentionHooks = DEFAULT_HOOKS) -> DecodePipelineConfig:
    """The config with the launch shape kernels.tuning chooses for these axes."""
    pair = hooks.query_pair_transform is not None or hooks.key_pair_transform is not None
    return DecodePipelineConfig(kind, head_dim, group, decode_pipeline_shape(kind, head_dim, group, pair), hooks)


@cuda.jit(device=True, inline="always")
def _stage_offsets(sh_off, slot, stage, T, flat, nthreads, t_begin, t_end, page_base, kv_indices, page_size,
                   magic, shift, page_stride, token_stride, head_offset, header, request):  # fmt: skip
    """Word offsets of the T tokens of ``stage`` into sh_off[slot * T:], -1 past the tile's end and
    where the guard refused the page id."""
    for l0 in range(0, T, nthreads):  # compile-time trip count
        li = int32(l0 + flat)
        t = int32(t_begin + int32(stage) * T + li)  # int32: no 64-bit compares in the stage loop
        off = int64(-1)
        if li >= T:
            continue
        if t < t_end:
            off = paged_word_offset(t, page_base, kv_indices, page_size, magic, shift, page_stride, token_stride,
                                    head_offset, header, request)
        sh_off[slot * T + li] = off


@cuda.jit(device=True, inline="always")
def _issue_stage(sh_dst, src_words, sh_off, off_slot, buf, n_valid, T, CPR, ROW_WORDS, flat, nthreads):
    """cp.async the T rows whose offsets are in sh_off[off_slot * T:] into buffer ``buf`` of sh_dst; rows >= n_valid (past the
    tile's end) and rows whose offset is -1 (a page id the guard refused) are zero-filled and read nothing. Index math in int32 (non-negative: // and % by the
    compile-time CPR are shifts when it is a power of two); only the global word offset is int64."""
    for c0 in range(0, T * CPR, nthreads):  # compile-time trip count
        c = int32(c0 + flat)
        if (T * CPR) % nthreads != 0 and c >= T * CPR:  # compile-time False when the copies divide evenly
            continue
        li = int32(c // CPR)
        part = int32(c - li * CPR)
        row = int32(buf * T + li)
        off = sh_off[uint32(off_slot * T + li)]  # -1: a refused page id (kernels/page_table.py): ignore-src, nothing is read
        prim.cp_async_16(sh_dst, int32(row * ROW_WORDS + part * 4), src_words, off + part * 4, li < n_valid and off >= 0)


@cuda.jit(device=True, inline="always")
def _tile_metadata(tile, tile_stop, tile_request, tile_kv_head, tile_token_start, tile_token_end, tile_slot):
    """(request, kv_head, token start, token end, slot) of ``tile``; an empty tile past ``tile_stop``."""
    if tile < tile_stop:
        return (int64(tile_request[tile]), int64(tile_kv_head[tile]), int32(tile_token_start[tile]),
                int32(tile_token_end[tile]), int64(tile_slot[tile]))  # fmt: skip
    return int64(0), int64(0), int32(0), int32(0), int64(-1)


@cuda.jit(device=True, inline="always")
def _sum_lanes(words, base, n):
    """Sum of the n float32 (bit patterns) at words[base:base + n]: 16-byte shared loads when n % 4 == 0
    (base then 16-byte aligned)."""
    total = float32(0.0)
    if n % 4 == 0:
        for l in range(0, n, 4):
            w4 = prim.load_shared_16b(words, base + l)
            total += (prim.bits_to_f32(w4[0]) + prim.bits_to_f32(w4[1])) + (prim.bits_to_f32(w4[2]) + prim.bits_to_f32(w4[3]))
    else:
        for l in range(n):
            total += prim.bits_to_f32(words[base + l])
    return total


@cuda.jit(device=True, inline="always")
def _softmax_lane(s_val, include, m, d, kk, TPR):
    """One score of a stage -> (weight, rescale): the stage max over the TPR lanes holding its head's
    tokens (aligned lane groups), one rescale of this lane's running state (m[kk], d[kk]) and the
    weight (a left-out score selected to 0). Every lane of a head computes the same max and rescale
    (the accumulators take it from the head's first lane). A NaN weight makes this lane's max NaN."""
    # a NaN score may be dropped by this max: its weight ex2(NaN - m) is NaN all the same, and a NaN d
    # sets m to NaN below, so output and LSE turn NaN
    m_stage = prim.warp_max(s_val if include else NEG_INF, TPR)
    m_old = m[kk]
    m_new = m_old
    rescale = float32(1.0)
    if not (m_stage == NEG_INF):
        m_new = prim.max_nan(m_old, m_stage)
        rescale = prim.ex2(m_old - m_new)
    w = prim.ex2(s_val - m_new)
    w = w if include else float32(0.0)  # selected, so a left-out row adds nothing
    d_new = d[kk] * rescale + w
    m[kk] = float32(math.nan) if d_new != d_new else m_new
    d[kk] = d_new
    return w, rescale


@cuda.jit(device=True, inline="always")
def _row_max(values, first, n):
    """NaN-keeping maximum of values[first:first + n] (one head's running maxima over its score lanes)."""
    out = NEG_INF
    for j in range(n):
        out = prim.max_nan(out, values[first + j])
    return out


def make_decode_pipeline_kernel(cfg: DecodePipelineConfig) -> Callable[..., Any]:
    """The plain Python kernel function for ``cfg`` (cuda.jit it to launch, compile_ptx to check)."""
    KIND, HEAD_DIM, GROUP = cfg.kind, cfg.head_dim, cfg.group
    BDX, SLICES, ROWS, TPR, STAGES = cfg.shape.lanes, cfg.shape.heads, cfg.shape.rows, cfg.shape.tokens_per_row, cfg.shape.stages
    HPT = cfg.shape.heads_per_thread  # query heads per thread
    HEADS = SLICES * HPT  # query heads per pass over the tile
    T = ROWS * TPR
    NTHREADS = BDX * SLICES * ROWS
    LANES = HEAD_DIM // 8
    WORDS8 = prim.words_per_row8(KIND)
    ROW_WORDS = LANES * WORDS8  # words per head_dim row of the value dtype
    CPR = ROW_WORDS // 4  # 16-byte copies per row
    TILE_WORDS = STAGES * T * ROW_WORDS
    OFF_STAGES = 2 * STAGES  # stage s's offsets in slot s % OFF_STAGES: alive until its scores are made
    OFF_SLOTS = OFF_STAGES * T
    COMBINE = HEADS * ROWS * HEAD_DIM
    # the rows' partial outputs are combined in the K buffers when they fit (every K read is over by then)
    ACC_IN_K = COMBINE <= TILE_WORDS
    ACC_WORDS = 1 if ACC_IN_K else COMBINE
    STATES = HEADS * ROWS
    QW = HPT * 8  # q / accumulator registers per thread
    NS = HPT * TPR  # scores per row group and stage: (head h, token j) at h * TPR + j
    VPL = -(-NS // BDX)  # scores each lane reduces and turns into weights
    if TPR & (TPR - 1) or BDX % TPR:
        raise ValueError(f"tokens_per_row {TPR} must be a power of two dividing the lanes {BDX}")
    GROUPS = SLICES * ROWS  # row groups: threads (any lane) sharing a y and z index
    RED_WORDS = GROUPS * NS * BDX  # every lane's partial dot products, [group][score][lane]
    WSTRIDE = NS + HPT  # per row group: NS weights, then HPT rescale factors
    W_SLOTS = GROUPS * WSTRIDE
    NS_SLOTS = GROUPS * NS
    WAIT = prim.cp_async_wait_group(2 * STAGES - 1)
    SIM = SIMULATOR
    hooks = cfg.hooks
    HAS_LOGITS_HOOK = hooks.logits_transform is not None
    HAS_MASK = hooks.logits_mask is not None
    HAS_Q_PAIR = hooks.query_pair_transform is not None
    HAS_K_PAIR = hooks.key_pair_transform is not None
    HAS_SINK = hooks.sink is not None
    SOFTMAX = hooks.softmax
    NATURAL = HAS_LOGITS_HOOK or not SOFTMAX  # scores in natural units (else log2 units)
    HALF_LANES = LANES // 2
    ALL_ACTIVE = LANES == BDX  # every lane holds 8 dims (head_dim / 8 a power of two)
    # no mask and no logits hook: only zero-filled tail rows (V = 0) and -inf scores are left out, so P.V
    # may run on every row with the weight selected to 0 (no branch); otherwise rows are skipped
    DENSE_PV = SOFTMAX and not HAS_MASK and not HAS_LOGITS_HOOK
    CACHE_KEY = int(hashlib.sha256(f"{hooks.name}|{cfg.shape}|{_kernel_sources_digest()}".encode()).hexdigest()[:15], 16)
    q_hook = hooks.query_transform or _identity_vec
    k_hook = hooks.key_transform or _identity_vec
    o_hook = hooks.output_transform or _identity_vec
    logit_hook = hooks.logits_transform or _identity_logit
    mask_hook = hooks.logits_mask or _no_mask
    q_pair_hook = hooks.query_pair_transform or _identity_pair
    k_pair_hook = hooks.key_pair_transform or _identity_pair
    sink_hook = hooks.sink or _no_sink
    load_row8, load_shared_row8, store_row8 = prim.load_row8, prim.load_shared_row8, prim.store_row8
    ex2, warp_sum, commit = prim.ex2, prim.warp_sum, prim.cp_async_commit
    f32_bits, bits_f32 = prim.f32_to_bits, prim.bits_to_f32

    def decode_pipeline_kernel(
        header, cta_tile_indptr, tile_request, tile_kv_head, tile_token_start, tile_token_end, tile_slot,
        kv_indptr, kv_indices, kv_len,
        q_words, q_stride_b, q_stride_h,
        k_words, v_words, page_stride, token_stride, head_stride, page_size,
        out_words, lse, write_lse, partial_out, partial_lse,
        sm_scale, num_qo_heads, params,
        page_div_magic, page_div_shift,
    ):  # fmt: skip
        if CACHE_KEY < 0:  # never true; keeps CACHE_KEY in the closure
            return
        tx = cuda.threadIdx.x
        hy = cuda.threadIdx.y
        tz = cuda.threadIdx.z
        flat = int32(tx + BDX * (hy + SLICES * tz))
        active = ALL_ACTIVE or tx < LANES
        dim0 = tx * 8
        if SIM:
            sh_k = cuda.shared.array(TILE_WORDS, int32)
            sh_v = cuda.shared.array(TILE_WORDS, int32)
        else:
            sh_k = cuda.shared.array(TILE_WORDS, int32, alignment=16)
            sh_v = cuda.shared.array(TILE_WORDS, int32, alignment=16)
        sh_off = cuda.shared.array(OFF_SLOTS, int64)
        sh_x = cuda.shared.array(ACC_WORDS, int32)
        sh_acc = sh_k if ACC_IN_K else sh_x  # float32 bits
        if SIM:
            sh_red = cuda.shared.array(RED_WORDS, int32)  # float32 bits
        else:
            sh_red = cuda.shared.array(RED_WORDS, int32, alignment=16)
        sh_w = cuda.shared.array(W_SLOTS, float32)
        sh_use = cuda.shared.array(NS_SLOTS, int32)
        sh_m = cuda.shared.array(NS_SLOTS, float32)  # end of a pass: each score lane's running state
        sh_d = cuda.shared.array(NS_SLOTS, float32)
        q = cuda.local.array(QW, float32)  # head h's 8 dims at q[h * 8:]
        acc = cuda.local.array(QW, float32)
        m = cuda.local.array(VPL, float32)  # running max of the head of this lane's scores (log2 units)
        d = cuda.local.array(VPL, float32)  # this lane's share of that head's softmax sum
        kv8 = cuda.local.array(8, float32)
        pair8 = cuda.local.array(8, float32)
        part = cuda.local.array(NS, float32)  # this lane's partial dot products, (head h, token j) at h * TPR + j
        rg = int32(hy * ROWS + tz)  # this thread's row group
        # unsigned shared-memory bases: indices built on them need no negative-index wraparound
        red_base = uint32(rg * NS * BDX + tx)
        w_base = uint32(rg * WSTRIDE)
        use_base = uint32(rg * NS)
        partner = tx + HALF_LANES if tx < HALF_LANES else tx - HALF_LANES  # lane of the rotate-half partner
        q_scale = float32(sm_scale) if NATURAL else float32(sm_scale * LOG2E)
        ps = int32(page_size)
        magic = int64(page_div_magic)
        shift = int32(page_div_shift)
        ts32 = int32(token_stride)
        num_tiles = header[H_NUM_TILES]
        cta = cuda.blockIdx.x
        tile_first = cta_tile_indptr[cta]
        tile_stop = min(cta_tile_indptr[cta + 1], num_tiles)
        # per-tile prologue: the next tile's metadata is loaded while the current tile runs
        n_request, n_kv_head, n_begin, n_end, n_slot = _tile_metadata(
            tile_first, tile_stop, tile_request, tile_kv_head, tile_token_start, tile_token_end, tile_slot)
        for tile in range(tile_first, tile_stop):
            request, kv_head, t_begin, t_end, slot = n_request, n_kv_head, n_begin, n_end, n_slot
            n_request, n_kv_head, n_begin, n_end, n_slot = _tile_metadata(
                tile + 1, tile_stop, tile_request, tile_kv_head, tile_token_start, tile_token_end, tile_slot)
            qo_pos = kv_len[request] - 1
            page_base = int64(kv_indptr[request])
            head_offset = int32(kv_head * head_stride)
            num_stages = (t_end - t_begin + (T - 1)) // T
            for head0 in range(0, GROUP, HEADS):
                g0 = head0 + hy * HPT  # this thread's first head inside the group
                for h in range(HPT):
                    g = g0 + h
                    qo_head = kv_head * GROUP + g
                    for k in range(8):
                        kv8[k] = float32(0.0)
                        acc[h * 8 + k] = float32(0.0)
                    if active and g < GROUP:
                        q_row = request * q_stride_b + qo_head * q_stride_h
                        load_row8(q_words, q_row + tx * WORDS8, KIND, kv8)
                        if HAS_Q_PAIR:
                            load_row8(q_words, q_row + partner * WORDS8, KIND, pair8)
                            q_pair_hook(kv8, pair8, dim0, HEAD_DIM, request, qo_head, qo_pos, params)
                        q_hook(kv8, dim0, request, qo_head, qo_pos, params)
                    for k in range(8):
                        q[h * 8 + k] = kv8[k] * q_scale
                for kk in range(VPL):
                    m[kk] = NEG_INF
                    d[kk] = float32(0.0)
                if num_stages > 0:
                    # prologue: offsets, then K and V of the first STAGES stages in flight
                    for s in range(STAGES):
                        _stage_offsets(sh_off, s, s, T, flat, NTHREADS, t_begin, t_end, page_base, kv_indices, ps,
                                       magic, shift, page_stride, ts32, head_offset, header, request)  # fmt: skip
                    cuda.syncthreads()
                    for s in range(STAGES):
                        if s < num_stages:
                            _issue_stage(sh_k, k_words, sh_off, s, s, t_end - t_begin - s * T, T, CPR, ROW_WORDS, flat, NTHREADS)
                        commit()
                        if s < num_stages:
                            _issue_stage(sh_v, v_words, sh_off, s, s, t_end - t_begin - s * T, T, CPR, ROW_WORDS, flat, NTHREADS)
                        commit()
                for i in range(num_stages):
                    buf = int32(i % STAGES)
                    t_stage = int32(t_begin + i * T)
                    WAIT()  # K of stage i landed (this thread's copies) ...
                    cuda.syncthreads()  # ... and every thread's
                    # Q.K for this row's TPR tokens: each K row read and widened once for the HPT heads
                    row0 = int32((buf * T + tz * TPR) * ROW_WORDS)  # this row's first token in the buffers
                    for j in range(TPR):
                        t = int32(t_stage + tz * TPR + j)
                        row_w = row0 + j * ROW_WORDS
                        for k in range(8):
                            kv8[k] = float32(0.0)
                        if active:
                            load_shared_row8(sh_k, row_w + tx * WORDS8, KIND, kv8)
                            if HAS_K_PAIR:
                                load_shared_row8(sh_k, row_w + partner * WORDS8, KIND, pair8)
                                k_pair_hook(kv8, pair8, dim0, HEAD_DIM, request, kv_head, t, params)
                            k_hook(kv8, dim0, request, kv_head, t, params)
                        for h in range(HPT):
                            p = float32(0.0)
                            for k in range(8):
                                p += q[h * 8 + k] * kv8[k]
                            part[h * TPR + j] = p
                    # partial dot products to shared memory: one reduction per stage, not per token
                    for v in range(NS):
                        sh_red[red_base + uint32(v * BDX)] = f32_bits(part[v])
                    # the offsets of stage i + STAGES into its slot (last read by stage i - STAGES's scores)
                    next_slot = int32(uint32(i + STAGES) % uint32(OFF_STAGES))
                    if i + STAGES < num_stages:
                        _stage_offsets(sh_off, next_slot, i + STAGES, T, flat, NTHREADS, t_begin, t_end, page_base,
                                       kv_indices, ps, magic, shift, page_stride, ts32, head_offset, header, request)  # fmt: skip
                    cuda.syncthreads()  # every thread done with sh_k[buf]; new offsets and partials visible
                    if i + STAGES < num_stages:
                        _issue_stage(sh_k, k_words, sh_off, next_slot, buf, t_end - t_stage - STAGES * T, T, CPR, ROW_WORDS,
                                     flat, NTHREADS)  # fmt: skip
                    commit()
                    # lane tx (+ kk * BDX) owns score v: sums the lanes' partials, applies the hooks, and
                    # (softmax) takes the stage max over its head's TPR lanes and makes the weight
                    for kk in range(VPL):
                        v_raw = int32(tx + kk * BDX)
                        live = v_raw < NS
                        v = min(v_raw, int32(NS - 1))
                        h = int32(v // TPR)
                        j = int32(v - h * TPR)
                        s_val = _sum_lanes(sh_red, (rg * NS + v) * BDX, LANES)
                        t = int32(t_stage + tz * TPR + j)
                        qo_head = kv_head * GROUP + g0 + h
                        if HAS_LOGITS_HOOK:
                            s_val = float32(logit_hook(s_val, request, qo_pos, t, qo_head, kv_head, params))
                            if SOFTMAX:
                                s_val = float32(s_val * LOG2E)
                        # past the tile's end or a refused page id: offset -1 (the rows read nothing)
                        valid = sh_off[(uint32(i) % uint32(OFF_STAGES)) * uint32(T) + uint32(tz * TPR + j)] >= 0
                        include = valid and not (s_val == NEG_INF)
                        if HAS_MASK:
                            if valid and not mask_hook(request, qo_pos, t, qo_head, kv_head, params):
                                include = False
                        w = s_val  # softmax-free: the weight is the score itself
                        if SOFTMAX:
                            w, rescale = _softmax_lane(s_val, include, m, d, kk, TPR)
                            if live and j == 0:
                                sh_w[w_base + uint32(NS + h)] = rescale
                        if live:
                            sh_w[w_base + uint32(v)] = w
                            if not DENSE_PV:
                                sh_use[use_base + uint32(v)] = 1 if include else 0
                    WAIT()  # V of stage i landed
                    cuda.syncthreads()  # ... and the weights are visible
                    if active:
                        if SOFTMAX:
                            for h in range(HPT):
                                rescale = sh_w[w_base + uint32(NS + h)]
                                for k in range(8):
                                    acc[h * 8 + k] *= rescale
                        # P.V: each V row read and widened once for the HPT heads (the weights in
                        # registers: part[] indexed by compile-time constants only)
                        for v in range(NS):
                            part[v] = sh_w[w_base + uint32(v)]
                            if not DENSE_PV:
                                if sh_use[use_base + uint32(v)] == 0:
                                    part[v] = NEG_INF  # left out: the sentinel, tested below
                        for j in range(TPR):
                            load_shared_row8(sh_v, row0 + j * ROW_WORDS + tx * WORDS8, KIND, kv8)
                            for h in range(HPT):
                                w = part[h * TPR + j]
                                if DENSE_PV or not (w == NEG_INF):
                                    for k in range(8):
                                        acc[h * 8 + k] += w * kv8[k]
                    cuda.syncthreads()  # every thread done with sh_v[buf] and sh_w
                    if i + STAGES < num_stages:
                        _issue_stage(sh_v, v_words, sh_off, next_slot, buf, t_end - t_stage - STAGES * T, T, CPR, ROW_WORDS,
                                     flat, NTHREADS)  # fmt: skip
                    commit()
                # combine the ROWS token rows of each head
                for h in range(HPT):
                    state = (hy * HPT + h) * ROWS + tz
                    if active:
                        for k in range(8):
                            sh_acc[state * HEAD_DIM + dim0 + k] = f32_bits(acc[h * 8 + k])
                for kk in range(VPL):
                    if tx + kk * BDX < NS:
                        sh_m[rg * NS + tx + kk * BDX] = m[kk]
                        sh_d[rg * NS + tx + kk * BDX] = d[kk]
                cuda.syncthreads()
                for h in range(HPT):
                    g = g0 + h
                    if tz == h % ROWS and active and g < GROUP:
                        qo_head = kv_head * GROUP + g
                        for k in range(8):
                            kv8[k] = float32(0.0)
                        lse_value = NEG_INF
                        base = (hy * HPT + h) * ROWS
                        if SOFTMAX:
                            m_all = NEG_INF
                            for r in range(ROWS):
                                m_all = prim.max_nan(m_all, _row_max(sh_m, (hy * ROWS + r) * NS + h * TPR, TPR))
                            d_all = float32(0.0)
                            if not (m_all == NEG_INF):
                                for r in range(ROWS):
                                    first = (hy * ROWS + r) * NS + h * TPR
                                    m_r = _row_max(sh_m, first, TPR)
                                    if not (m_r == NEG_INF):
                                        w = ex2(m_r - m_all)
                                        d_r = float32(0.0)
                                        for jj in range(TPR):
                                            d_r += sh_d[first + jj]
                                        d_all += d_r * w
                                        for k in range(8):
                                            kv8[k] += bits_f32(sh_acc[(base + r) * HEAD_DIM + dim0 + k]) * w
                            if HAS_SINK and slot < 0:
                                # the sink: a state (zeros, LSE = sink) joined once; split requests: in the merge
                                sink = float32(sink_hook(qo_head, params) * LOG2E)
                                if sink > NEG_INF:
                                    m_new = prim.max_nan(m_all, sink)
                                    rescale = ex2(m_all - m_new)
                                    d_all = d_all * rescale + ex2(sink - m_new)
                                    for k in range(8):
                                        kv8[k] *= rescale
                                    m_all = m_new
                            if not (d_all == float32(0.0)):
                                inv = float32(1.0) / d_all
                                for k in range(8):
                                    kv8[k] *= inv
                                lse_value = float32((m_all + math.log2(d_all)) * LN2)
                        else:
                            for r in range(ROWS):
                                for k in range(8):
                                    kv8[k] += bits_f32(sh_acc[(base + r) * HEAD_DIM + dim0 + k])
                            lse_value = float32(0.0)
                        if slot < 0:
                            o_hook(kv8, dim0, request, qo_head, qo_pos, params)
                            out_row = request * num_qo_heads + qo_head
                            store_row8(out_words, out_row * ROW_WORDS + tx * WORDS8, KIND, kv8)
                            if tx == 0 and write_lse != 0:
                                lse[out_row] = lse_value
                        else:
                            part_row = slot * GROUP + g
                            for k in range(8):
                                partial_out[part_row * HEAD_DIM + dim0 + k] = kv8[k]
                            if tx == 0:
                                partial_lse[part_row] = lse_value
                cuda.syncthreads()

    return DECODE_PIPELINE_ARGS.check(decode_pipeline_kernel)


@lru_cache(maxsize=128)
def decode_pipeline_kernel(cfg: DecodePipelineConfig) -> Any:
    """The launchable kernel for ``cfg`` (compiled on first launch; ``TILEGRAPH_KERNEL_CACHE=1``:
    numba's disk cache on a GPU, keyed as in kernels.decode)."""
    disk = not SIMULATOR and os.environ.get("TILEGRAPH_KERNEL_CACHE") == "1"
    return cuda.jit(make_decode_pipeline_kernel(cfg), fastmath=fastmath_flags(), cache=disk)


@lru_cache(maxsize=1)
def _kernel_sources_digest() -> str:
    """sha256 of tilegraph's kernel sources (numba's disk cache does not track helper modules)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def gpu_compile_specs() -> list[CompileSpec]:
    """Covering set: every dtype, head_dim 16..256, group 1..16 (passes), default and hooked
    variants, every built-in variant at least once."""
    from .compile_spec import DECODE_CHECK_HOOKS as CHECK_HOOKS
    from .compile_spec import CompileSpec, PerfHints
    from .compile_spec import decode_variant_cases as builtin_variant_cases

    cases = [
        (prim.BF16, 128, 4, DEFAULT_HOOKS),  # the benchmark shape (Hq 32 / Hkv 8)
        (prim.F16, 128, 1, DEFAULT_HOOKS),
        (prim.F16, 64, 16, DEFAULT_HOOKS),
        (prim.F32, 256, 2, DEFAULT_HOOKS),
        (prim.BF16, 16, 3, DEFAULT_HOOKS),
        (prim.BF16, 128, 4, CHECK_HOOKS),
        *builtin_variant_cases(),
    ]
    specs = []
    for kind, head_dim, group, hooks in cases:
        cfg = pipeline_config(kind, head_dim, group, hooks)
        specs.append(
            CompileSpec(
                name=f"decode_pipeline[{DTYPE_NAMES[kind]},hd{head_dim},g{group},{hooks.name.split('#')[0]}]",
                pyfunc=make_decode_pipeline_kernel(cfg),
                signature=DECODE_PIPELINE_ARGS.signature,
                # softmax-free variants take no maximum: NaN reaches them through the sums alone
                expect=("cp.async.cg.shared.global", "cp.async.wait_group", "ex2.approx") + ((NAN_PTX,) if hooks.softmax else ()),
                fastmath=fastmath_flags(),
                # every copy moves K/V bytes; num_ctas = SMs x cfg.ctas_per_sm(); held to the decode family's budgets
                perf=PerfHints(threads=cfg.threads, ctas_per_sm=cfg.ctas_per_sm(), family="decode"),
            )
        )
    return specs
