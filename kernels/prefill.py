"""Batch prefill / append attention over paged or ragged KV: persistent CTAs walk their tiles.

A tile (planner/prefill_layout.py) is up to ``q_tile`` query tokens of one request against a KV
token range, for the GQA group of one kv_head. Its query *rows* pack tokens x heads
(row = token_index * HP + head_in_pass); groups larger than ROWS_PER_TILE take several passes of
HP heads over the same KV range. Per pass, in KV blocks of KB tokens, the CTA runs the classic
tiled-attention steps, each separated by a barrier:

    1. load K/V block -> shared sk/sv [KB, D] fp32   (key hook applied)
    2. S = Q K^T      -> shared ss [ROWS, KB]         (log2 domain; logits hook, causal and hook masks)
    3. online softmax per row: m, d, rescale; ss <- P = 2^(S - m)
    4. O = O * rescale + P V   (O in registers: each thread owns (row, 8-dim vector) items)

Steps 2 and 4 are the *core*: two small matrix products on CUDA cores (one thread per score /
per output 8-vector), the device functions ``scores`` and ``accumulate_pv`` below. A tensor-core
version replaces exactly those two with mma.sync m16n8k16 fragments (ROWS <= 16 rows = one A
fragment; KB = 16 = one k-step of P V), keeping the loads, the softmax step, the epilogue and the
plan format. (Its O accumulator would live in mma C fragments instead of ``acc`` items.)

Positions: query token t (request-local) of a request with qo_len q and kv_len k sits at KV position
``qo_pos = k - q + t``; causal masking keeps kv_pos <= qo_pos. Scores live in the log2 domain
(``ex2``); every LSE written is a natural log. A tile with slot -1 writes final rows (and LSE); a
split tile writes fp32 partials (normalized output, natural LSE) into slot ``slot + i * stride`` for
its query token i, combined afterwards by the decode partial-merge kernel (whose "request" is the
global query token). An empty KV range writes zeros and -inf.

Variants (``kernels.hooks.AttentionHooks``, built by ``tilegraph.Variant``) with query positions qo_pos as
above: query / key transforms, rotate-half pair transforms (the partner half re-loaded from global
memory: q at its token's qo_pos, k at its kv position), logits transform and mask, a sink folded
into final rows here and into split rows by the merge (once per row either way), softmax-free
(weights = the transformed scores; partials are plain sums, LSE 0) and the output transform on
final rows only (split rows: in the merge, which finds each query token's request and qo_pos).

Caller positions (run time, off by default): with ``use_positions`` the kernel takes query token
positions from ``row_qo_pos`` (int32, indexed by the global query row) and adds
``entry_kv_offset[request]`` (int32 per plan entry) to every kv position the hooks see (the page
walk stays request-local). CascadeAttention uses them to give each level the positions of flat
attention over the concatenated KV; BatchPrefill passes one-word stand-ins and 0.

Compile-time specialization: dtype code, head_dim, group size, q_tile, paged/ragged, causal, block
size and the variant hooks. Everything else (plan, strides, scale, the variant's float32 ``params``)
is read at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

from numba import float32, int32, int64

from tilegraph._device import cuda
from tilegraph.errors import InputError
from tilegraph.planner.layout import H_NUM_PAGES, H_NUM_TILES
from tilegraph.planner.prefill_layout import ROWS_PER_TILE, query_tile_tokens

from . import primitives as prim
from .args import ATTENTION_KV_OUT_ARGS, I32, KernelArgs
from .hooks import DEFAULT_HOOKS, DTYPE_NAMES, LN2, LOG2E, NEG_INF, AttentionHooks
from .hooks import identity_logit as _identity_logit
from .hooks import identity_pair as _identity_pair
from .hooks import identity_vec as _identity_vec
from .hooks import no_mask as _no_mask
from .hooks import no_sink as _no_sink
from .nan import NAN_PTX, fastmath_flags, nan_expect, nan_max
from .page_table import guarded_page
from .tuning import prefill_kv_block, prefill_threads

if TYPE_CHECKING:
    from .compile_spec import CompileSpec

#: AttentionHooks fields this kernel does not implement (a config naming one is refused): none left
UNSUPPORTED_HOOKS: tuple[str, ...] = ()

PREFILL_ARGS = KernelArgs("prefill", (
    ("header", I32), ("cta_tile_indptr", I32), ("tile_request", I32), ("tile_q_start", I32), ("tile_q_end", I32),
    ("tile_kv_head", I32), ("tile_kv_start", I32), ("tile_kv_end", I32), ("tile_slot", I32), ("tile_slot_stride", I32),
    ("qo_indptr", I32), ("kv_indptr", I32), ("kv_indices", I32), ("kv_len", I32),
    ("q_words", I32), ("q_stride_n", "int64"), ("q_stride_h", "int64"),
    *ATTENTION_KV_OUT_ARGS,
    ("row_qo_pos", I32), ("entry_kv_offset", I32), ("use_positions", "int32"),
    # page_size's divisor (kernels.decode_pipeline.page_divisor): the tensor-core kernel's page lookup
    ("page_div_magic", "int64"), ("page_div_shift", "int64"),
))  # fmt: skip


@dataclass(frozen=True)
class PrefillConfig:
    """One compiled specialization of the prefill kernel."""

    kind: int  # primitives.F16 / BF16 / F32
    head_dim: int
    group: int
    paged: bool
    causal: bool
    threads: int
    hooks: AttentionHooks = DEFAULT_HOOKS

    def __post_init__(self) -> None:
        unsupported = [name for name in UNSUPPORTED_HOOKS if getattr(self.hooks, name, None) is not None]
        if unsupported:
            raise InputError(f"the prefill kernel does not support the hooks {unsupported} of variant {self.hooks.name!r}")
        pairs = self.hooks.query_pair_transform is not None or self.hooks.key_pair_transform is not None
        if pairs and self.head_dim % 16:
            raise InputError(f"variant {self.hooks.name!r}: pair transforms (RoPE) need head_dim % 16 == 0, got {self.head_dim}")

    @property
    def splittable(self) -> bool:
        """Split-KV plans are allowed for every variant: the merge applies the sink and the output
        hook once per merged row (and sums softmax-free partials)."""
        return True

    @property
    def q_tile(self) -> int:
        """Query tokens per pass (a plan's tiles may hold more: the kernel runs them in passes)."""
        return query_tile_tokens(self.group)

    @property
    def heads_per_pass(self) -> int:
        return min(self.group, ROWS_PER_TILE)

    @property
    def rows(self) -> int:
        return self.q_tile * self.heads_per_pass

    @property
    def kv_block(self) -> int:
        """KV tokens per shared-memory block (sq + sk + sv + ss stay under 48 KB of static shared memory)."""
        return prefill_kv_block(self.head_dim)

    @property
    def block(self) -> tuple[int]:
        return (self.threads,)


def default_threads() -> int:
    """Threads per CTA (kernels.tuning.prefill_threads)."""
    return prefill_threads()


def make_prefill_kernel(cfg: PrefillConfig) -> Callable[..., Any]:
    """The plain Python kernel function for ``cfg`` (cuda.jit it to launch, compile_ptx to check)."""
    KIND, HEAD_DIM, GROUP, NT = cfg.kind, cfg.head_dim, cfg.group, cfg.threads
    PAGED, CAUSAL = cfg.paged, cfg.causal
    HP, ROWS, KB = cfg.heads_per_pass, cfg.rows, cfg.kv_block
    QT = cfg.q_tile  # query tokens of one pass
    LANES = HEAD_DIM // 8
    WORDS8 = prim.words_per_row8(KIND)
    ROW_WORDS = LANES * WORDS8
    ITEMS = -(-ROWS * LANES // NT)  # (row, 8-vector) output items per thread, held in registers
    ACC = ITEMS * 8
    hooks = cfg.hooks
    HAS_LOGITS_HOOK = hooks.logits_transform is not None
    HAS_MASK = hooks.logits_mask is not None
    HAS_Q_PAIR = hooks.query_pair_transform is not None
    HAS_K_PAIR = hooks.key_pair_transform is not None
    HAS_SINK = hooks.sink is not None
    SOFTMAX = hooks.softmax
    NATURAL = HAS_LOGITS_HOOK or not SOFTMAX  # scores in natural units before the hooks (else log2)
    q_pair_hook = hooks.query_pair_transform or _identity_pair
    k_pair_hook = hooks.key_pair_transform or _identity_pair
    sink_hook = hooks.sink or _no_sink
    q_hook = hooks.query_transform or _identity_vec
    k_hook = hooks.key_transform or _identity_vec
    o_hook = hooks.output_transform or _identity_vec
    logit_hook = hooks.logits_transform or _identity_logit
    mask_hook = hooks.logits_mask or _no_mask
    load_row8, store_row8, ex2 = prim.load_row8, prim.store_row8, prim.ex2

    @cuda.jit(device=True, inline="always")
    def kv_page_id(request, t, kv_indptr, kv_indices, header, page_size):
        """The page id holding KV token t (request-local) of ``request``: the ONE place this kernel
        reads the page table, through the guard (kernels/page_table.py): -1 for an id outside the pool."""
        return guarded_page(kv_indices, int64(kv_indptr[request]) + t // page_size, header[H_NUM_PAGES], header, request)

    @cuda.jit(device=True, inline="always")
    def kv_row(request, t, kv_head, kv_indptr, kv_indices, header, page_stride, token_stride, head_stride, page_size):
        """First word of KV token t (request-local) of kv_head: paged through the page table, or ragged."""
        if PAGED:
            page = kv_page_id(request, t, kv_indptr, kv_indices, header, page_size)
            if page < 0:  # outside the pool: the caller reads nothing
                return int64(-1)
            return page * page_stride + (t % page_size) * token_stride + kv_head * head_stride
        return (int64(kv_indptr[request]) + t) * token_stride + kv_head * head_stride

    @cuda.jit(device=True, inline="always")
    def partner_words(dim0):
        """Word offset (within a row) of the 8 rotate-half partner elements of dims dim0 .. dim0 + 7."""
        return ((dim0 + HEAD_DIM // 2) % HEAD_DIM // 8) * WORDS8

    @cuda.jit(device=True, inline="always")
    def token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok):
        """qo_pos of the tile's query token tok: the request-local default, or (``use_positions``)
        the caller's per-row position (global query row row0 + tok)."""
        if use_positions != 0:
            return int64(row_qo_pos[row0 + tok])
        return qo_pos0 + tok

    @cuda.jit(device=True, inline="always")
    def scores(sq, sk, ss, srefused, tid, n_rows, n_kv, kb0, head0, kv_head, request, qo_pos0, params,
               use_positions, row_qo_pos, row0, kv_off):  # fmt: skip
        """Core 1 (mma-replaceable): ss[r, c] = q_r . k_c in the log2 domain (softmax-free: the
        transformed score), -inf where masked or where row c's page id was refused (srefused[c])."""
        for item in range(tid, n_rows * n_kv, NT):
            r = item // n_kv
            c = item - r * n_kv
            s = float32(0.0)
            for dim in range(HEAD_DIM):
                s += sq[r, dim] * sk[c, dim]
            tok = r // HP
            head = head0 + r - tok * HP
            qo_pos = token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok)
            kv_pos = kv_off + kb0 + c
            qo_head = kv_head * GROUP + head
            if HAS_LOGITS_HOOK:
                s = float32(logit_hook(s, request, qo_pos, kv_pos, qo_head, kv_head, params))
            if NATURAL and SOFTMAX:
                s = float32(s * LOG2E)
            keep = head < GROUP and srefused[c] == 0
            if CAUSAL:
                keep = keep and kv_pos <= qo_pos
            if HAS_MASK:
                keep = keep and mask_hook(request, qo_pos, kv_pos, qo_head, kv_head, params)
            ss[r, c] = s if keep else NEG_INF

    @cuda.jit(device=True, inline="always")
    def softmax_step(ss, sm, sd, sscale, tid, n_rows, n_kv):
        """Online softmax per row: new max, rescale of the old state, ss <- probabilities (log2 domain).
        Softmax-free: ss keeps the scores as weights, no rescale. Masked entries stay -inf in both:
        accumulate_pv selects them out (never 0 * v: NaN/Inf stored there must not reach a row); a
        NaN score propagates (nan_max), so its row shows it."""
        for r in range(tid, n_rows, NT):
            if not SOFTMAX:
                sscale[r] = float32(1.0)
                continue
            m_old = sm[r]
            m_new = m_old
            for c in range(n_kv):
                m_new = nan_max(m_new, ss[r, c])
            total = float32(0.0)
            if m_new == NEG_INF:
                scale = float32(1.0)
            else:
                scale = ex2(m_old - m_new)
                for c in range(n_kv):
                    if not (ss[r, c] == NEG_INF):
                        p = ex2(ss[r, c] - m_new)
                        ss[r, c] = p
                        total += p
            sd[r] = sd[r] * scale + total
            sm[r] = m_new
            sscale[r] = scale

    @cuda.jit(device=True, inline="always")
    def accumulate_pv(acc, ss, sv, sscale, tid, n_rows, n_kv):
        """Core 2 (mma-replaceable): O = O * rescale + P V for this thread's (row, 8-vector) items."""
        for i in range(ITEMS):
            item = tid + i * NT
            r = item // LANES
            if r < n_rows:
                dim0 = (item - r * LANES) * 8
                scale = sscale[r]
                for k in range(8):
                    acc[i * 8 + k] *= scale
                for c in range(n_kv):
                    p = ss[r, c]
                    if not (p == NEG_INF):  # masked: selected out
                        for k in range(8):
                            acc[i * 8 + k] += p * sv[c, dim0 + k]

    @cuda.jit(device=True, inline="always")
    def prefill_pass(sq, sk, sv, ss, srefused, sm, sd, acc, v8, pair8, sscale, tid, q_scale, work, geo, kv_indptr, kv_indices, header,
                     q_words, k_words, v_words, out_words, lse, partial_out, partial_lse, params, row_qo_pos):  # fmt: skip
        """Query tokens q_start .. q_start + n_tok of the tile (n_tok <= QT) against KV [kv_start,
        kv_end), in passes of HP heads: load, scores, softmax, P V per KV block, then the epilogue.
        ``work`` = (request, kv_head, q_start, n_tok, n_rows, kv_start, kv_end, slot, slot_stride,
        qo_begin, qo_pos0, row0, kv_off); ``geo`` = (q_stride_n, q_stride_h, page_stride, token_stride,
        head_stride, page_size, write_lse, num_qo_heads, use_positions) (tuples: a device call takes
        at most 30 arguments)."""
        request, kv_head, q_start, n_tok, n_rows, kv_start, kv_end, slot, slot_stride, qo_begin, qo_pos0, row0, kv_off = work
        q_stride_n, q_stride_h, page_stride, token_stride, head_stride, page_size, write_lse, num_qo_heads, use_positions = geo
        for head0 in range(0, GROUP, HP):
            # query rows -> sq (zeros past the tile), fresh softmax state
            for item in range(tid, ROWS * LANES, NT):
                r = item // LANES
                dim0 = (item - r * LANES) * 8
                tok = r // HP
                head = head0 + r - tok * HP
                for k in range(8):
                    v8[k] = float32(0.0)
                if tok < n_tok and head < GROUP:
                    qo_head = kv_head * GROUP + head
                    q_row = (qo_begin + q_start + tok) * q_stride_n + qo_head * q_stride_h
                    load_row8(q_words, q_row + (dim0 // 8) * WORDS8, KIND, v8)
                    if HAS_Q_PAIR:
                        load_row8(q_words, q_row + partner_words(dim0), KIND, pair8)
                        q_pair_hook(v8, pair8, dim0, HEAD_DIM, request, qo_head, token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok), params)
                    q_hook(v8, dim0, request, qo_head, token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok), params)
                for k in range(8):
                    sq[r, dim0 + k] = v8[k] * q_scale
            for r in range(tid, ROWS, NT):
                sm[r] = NEG_INF
                sd[r] = float32(0.0)
            for k in range(ACC):
                acc[k] = float32(0.0)
            cuda.syncthreads()
            for kb0 in range(kv_start, kv_end, KB):
                n_kv = min(int64(KB), kv_end - kb0)
                for item in range(tid, n_kv * LANES, NT):
                    c = item // LANES
                    dim0 = (item - c * LANES) * 8
                    row = kv_row(request, kb0 + c, kv_head, kv_indptr, kv_indices, header, page_stride, token_stride,
                                 head_stride, page_size)  # fmt: skip
                    if dim0 == 0:
                        srefused[c] = 1 if row < 0 else 0
                    if row < 0:  # a page id outside the pool: read nothing, stage zeros; scores() masks the row
                        for k in range(8):
                            sk[c, dim0 + k] = float32(0.0)
                            sv[c, dim0 + k] = float32(0.0)
                        continue
                    load_row8(k_words, row + (dim0 // 8) * WORDS8, KIND, v8)
                    if HAS_K_PAIR:
                        load_row8(k_words, row + partner_words(dim0), KIND, pair8)
                        k_pair_hook(v8, pair8, dim0, HEAD_DIM, request, kv_head, kv_off + kb0 + c, params)
                    k_hook(v8, dim0, request, kv_head, kv_off + kb0 + c, params)
                    for k in range(8):
                        sk[c, dim0 + k] = v8[k]
                    load_row8(v_words, row + (dim0 // 8) * WORDS8, KIND, v8)
                    for k in range(8):
                        sv[c, dim0 + k] = v8[k]
                cuda.syncthreads()
                scores(sq, sk, ss, srefused, tid, n_rows, n_kv, kb0, head0, kv_head, request, qo_pos0, params,
                       use_positions, row_qo_pos, row0, kv_off)
                cuda.syncthreads()
                softmax_step(ss, sm, sd, sscale, tid, n_rows, n_kv)
                cuda.syncthreads()
                accumulate_pv(acc, ss, sv, sscale, tid, n_rows, n_kv)
                cuda.syncthreads()
            # epilogue: normalize, natural LSE, final rows or partial slots
            for i in range(ITEMS):
                item = tid + i * NT
                r = item // LANES
                tok = r // HP
                head = head0 + r - tok * HP
                if r < n_rows and head < GROUP:
                    dim0 = (item - r * LANES) * 8
                    qo_head = kv_head * GROUP + head
                    lse_value = NEG_INF
                    for k in range(8):
                        v8[k] = float32(0.0)
                    if not SOFTMAX:
                        for k in range(8):
                            v8[k] = acc[i * 8 + k]  # plain sums: split partials are added by the merge
                        lse_value = float32(0.0)
                    else:
                        m_row = sm[r]
                        d = sd[r]
                        rescale = float32(1.0)
                        if HAS_SINK and slot < 0:
                            # the sink joins the denominator once: here for final rows, in the merge for split ones
                            sink = float32(sink_hook(qo_head, params) * LOG2E)
                            if not (sink == NEG_INF):
                                m_new = nan_max(m_row, sink)
                                rescale = ex2(m_row - m_new)
                                d = d * rescale + ex2(sink - m_new)
                                m_row = m_new
                        if d > float32(0.0) or d != d:  # NaN: the row shows it
                            inv = rescale / d
                            for k in range(8):
                                v8[k] = acc[i * 8 + k] * inv
                            lse_value = float32((m_row + math.log2(d)) * LN2)
                    if slot < 0:
                        o_hook(v8, dim0, request, qo_head, token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok), params)
                        out_row = (qo_begin + q_start + tok) * num_qo_heads + qo_head
                        store_row8(out_words, out_row * ROW_WORDS + (dim0 // 8) * WORDS8, KIND, v8)
                        if dim0 == 0 and write_lse != 0:
                            lse[out_row] = lse_value
                    else:
                        part_row = (slot + tok * slot_stride) * GROUP + head
                        for k in range(8):
                            partial_out[part_row * HEAD_DIM + dim0 + k] = v8[k]
                        if dim0 == 0:
                            partial_lse[part_row] = lse_value
            cuda.syncthreads()

    def prefill_kernel(
        header, cta_tile_indptr, tile_request, tile_q_start, tile_q_end, tile_kv_head, tile_kv_start, tile_kv_end,
        tile_slot, tile_slot_stride,
        qo_indptr, kv_indptr, kv_indices, kv_len,
        q_words, q_stride_n, q_stride_h,
        k_words, v_words, page_stride, token_stride, head_stride, page_size,
        out_words, lse, write_lse, partial_out, partial_lse,
        sm_scale, num_qo_heads, params,
        row_qo_pos, entry_kv_offset, use_positions, page_div_magic, page_div_shift,
    ):  # fmt: skip
        tid = cuda.threadIdx.x
        sq = cuda.shared.array((ROWS, HEAD_DIM), float32)
        sk = cuda.shared.array((KB, HEAD_DIM), float32)
        sv = cuda.shared.array((KB, HEAD_DIM), float32)
        ss = cuda.shared.array((ROWS, KB), float32)
        srefused = cuda.shared.array(KB, int32)  # 1: row c's page id was refused (kernels/page_table.py)
        sm = cuda.shared.array(ROWS, float32)
        sd = cuda.shared.array(ROWS, float32)
        sscale = cuda.shared.array(ROWS, float32)
        acc = cuda.local.array(ACC, float32)
        v8 = cuda.local.array(8, float32)
        pair8 = cuda.local.array(8, float32)
        # q pre-scaled into the log2 domain, unless a logits hook (or no softmax) needs the natural score
        q_scale = float32(sm_scale) if NATURAL else float32(sm_scale * LOG2E)
        geo = (int64(q_stride_n), int64(q_stride_h), int64(page_stride), int64(token_stride), int64(head_stride),
               int64(page_size), int64(write_lse), int64(num_qo_heads), int64(use_positions))  # fmt: skip
        num_tiles = header[H_NUM_TILES]
        cta = cuda.blockIdx.x
        tile_stop = min(cta_tile_indptr[cta + 1], num_tiles)
        for tile in range(cta_tile_indptr[cta], tile_stop):
            request = int64(tile_request[tile])
            kv_head = int64(tile_kv_head[tile])
            tile_q0 = int64(tile_q_start[tile])
            n_tok_tile = int64(tile_q_end[tile]) - tile_q0
            kv_start = int64(tile_kv_start[tile])
            kv_end = int64(tile_kv_end[tile])
            tile_slot0 = int64(tile_slot[tile])
            slot_stride = int64(tile_slot_stride[tile])
            qo_begin = int64(qo_indptr[request])
            kv_off = int64(0)
            if use_positions != 0:
                kv_off = int64(entry_kv_offset[request])
            # the plan's tile may hold more tokens than one pass of ROWS rows: passes of QT tokens
            for tok0 in range(0, n_tok_tile, QT):
                q_start = tile_q0 + tok0
                n_tok = min(int64(QT), n_tok_tile - tok0)
                slot = tile_slot0 + tok0 * slot_stride if tile_slot0 >= 0 else tile_slot0
                qo_pos0 = int64(kv_len[request]) - (int64(qo_indptr[request + 1]) - qo_begin) + q_start
                row0 = qo_begin + q_start
                n_rows = n_tok * HP
                work = (request, kv_head, q_start, n_tok, n_rows, kv_start, kv_end, slot, slot_stride, qo_begin,
                        qo_pos0, row0, kv_off)  # fmt: skip
                prefill_pass(sq, sk, sv, ss, srefused, sm, sd, acc, v8, pair8, sscale, tid, q_scale, work, geo, kv_indptr,
                             kv_indices, header, q_words, k_words, v_words, out_words, lse, partial_out, partial_lse, params,
                             row_qo_pos)  # fmt: skip

    return PREFILL_ARGS.check(prefill_kernel)


@lru_cache(maxsize=None)
def prefill_kernel(cfg: PrefillConfig) -> Any:
    """The launchable kernel for ``cfg``: compiled once per process (on first launch)."""
    return cuda.jit(make_prefill_kernel(cfg), fastmath=fastmath_flags())


def prefill_signature() -> str:
    """The numba signature of the prefill kernel (from PREFILL_ARGS)."""
    return PREFILL_ARGS.signature


def gpu_compile_specs() -> list[CompileSpec]:
    """Covering set: every dtype, head_dims 64..256, groups 1..8 (and a two-pass 32), paged and ragged,
    causal and not, default and hooked variants, every built-in variant (with its prefill merge kernel
    when the merge applies a hook)."""
    from .compile_spec import PREFILL_CHECK_HOOKS as CHECK_HOOKS
    from .compile_spec import CompileSpec, PerfHints
    from .compile_spec import prefill_variant_cases as _builtin_variant_cases
    from .merge import PARTIAL_MERGE_SIGNATURE, make_partial_merge_kernel
    from .tuning import GPU_THREADS, PARTIAL_MERGE_CTAS

    cases = [
        (prim.BF16, 128, 4, True, True, DEFAULT_HOOKS),  # the benchmark shape (Hq 32 / Hkv 8)
        (prim.F16, 128, 1, True, True, DEFAULT_HOOKS),
        (prim.BF16, 64, 4, True, False, DEFAULT_HOOKS),
        (prim.F32, 256, 2, False, True, DEFAULT_HOOKS),
        (prim.F16, 96, 3, False, False, DEFAULT_HOOKS),
        (prim.BF16, 128, 8, True, True, CHECK_HOOKS),
        (prim.F16, 64, 32, True, True, DEFAULT_HOOKS),
        *_builtin_variant_cases(),
    ]
    specs = []
    for kind, head_dim, group, paged, causal, hooks in cases:
        label = hooks.name.split("#")[0]
        if hooks.sink is not None or hooks.output_transform is not None or not hooks.softmax:
            specs.append(
                CompileSpec(
                    name=f"prefill_merge[{DTYPE_NAMES[kind]},{label}]",
                    pyfunc=make_partial_merge_kernel(kind, hooks, prefill=True),
                    signature=PARTIAL_MERGE_SIGNATURE,
                    expect=("ld.global.nc.v4.u32", *nan_expect(hooks)),
                    fastmath=fastmath_flags(),
                    perf=PerfHints(threads=GPU_THREADS, grid_ctas=PARTIAL_MERGE_CTAS),
                )
            )
        cfg = PrefillConfig(kind, head_dim, group, paged, causal, threads=128, hooks=hooks)
        name = f"prefill[{DTYPE_NAMES[kind]},hd{head_dim},g{group},{'paged' if paged else 'ragged'},{'causal' if causal else 'full'},{label}]"
        specs.append(
            CompileSpec(
                name=name,
                pyfunc=make_prefill_kernel(cfg),
                signature=prefill_signature(),
                expect=("ld.global.nc.v4.u32", "ex2.approx", "bar.sync", NAN_PTX) if hooks.softmax else ("ld.global.nc.v4.u32", "bar.sync"),
                fastmath=fastmath_flags(),
                perf=PerfHints(threads=cfg.threads, ctas_per_sm=2, bound="compute"),  # num_ctas = 2 x SMs
            )
        )
    return specs
