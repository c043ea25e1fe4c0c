"""Batch prefill on tensor cores (fp16 / bf16): mma.sync m16n8k16 over the prefill plan's tiles.

Same launch contract as ``kernels.prefill`` (PREFILL_ARGS, the plan of planner/prefill_layout.py,
slots and slot strides of split tiles, caller positions, natural-log LSE, every AttentionHooks
field); fp32 stays on the CUDA-core kernel. A tile's query rows (token x head, ROWS_PER_TILE = 16)
are one m16 block owned by one warp. Per pass of HP heads:

    Q   rows -> registers (query hooks) -> fp16/bf16 shared tile (swizzled) -> A fragments (ldmatrix)
    K/V blocks of KB tokens -> shared by cp.async (16 B, zero-filled past the range), 2 stages:
        block j + 1 is in flight while block j is computed (one commit group per block)
        (key hooks: K goes through registers instead, V still by cp.async)
    S = Q K^T: B fragments by ldmatrix from the K rows, fp32 accumulators; scale, logits hook,
        causal / hook / range masks SELECT -inf; online softmax on the C fragments (row max and sum
        over the quad by shuffles, nan_max); P packed to A fragments in registers
    O += P V: B fragments by ldmatrix.trans from the V rows, O in C fragments (fp32)
    epilogue: O (normalized) staged as fp32 rows in shared memory, then written by 8-vectors exactly
        like the CUDA-core kernel (sink, output hook, LSE, partial slots).

Shared tiles are int32 word arrays of rows of HEAD_DIM / 8 16-byte chunks; chunk c of row r is
stored at chunk c ^ (r mod SW), SW = min(8, the largest power of two dividing HEAD_DIM / 8) (the
128-byte XOR swizzle; head dims below 64, or not a multiple of 64, swizzle within SW chunks), so the 8 rows one ldmatrix phase reads hit distinct
bank groups.

Causal: KV blocks past the tile's last visible position are skipped. NaN: a masked / out-of-range
score is selected out; P V is a product, so a block that has a masked entry AND a non-finite V
element takes a scalar path that skips masked positions (0 * Inf must not reach a row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

from numba import float32, int32, int64

from tilegraph._device import SIMULATOR, cuda
from tilegraph.errors import InputError
from tilegraph.planner.layout import H_NUM_TILES
from tilegraph.planner.prefill_layout import ROWS_PER_TILE, query_tile_tokens

from . import primitives as prim
from .hooks import DEFAULT_HOOKS, DTYPE_NAMES, LN2, LOG2E, NEG_INF, AttentionHooks
from .hooks import identity_logit as _identity_logit
from .hooks import identity_pair as _identity_pair
from .hooks import identity_vec as _identity_vec
from .hooks import no_mask as _no_mask
from .hooks import no_sink as _no_sink
from .nan import NAN_PTX, fastmath_flags, nan_max
from .page_table import guarded_page
from .prefill import PREFILL_ARGS
from .tuning import prefill_mma_kv_block

if TYPE_CHECKING:
    from .compile_spec import CompileSpec

WARP = 32


@dataclass(frozen=True)
class PrefillMmaConfig:
    """One compiled specialization of the tensor-core prefill kernel."""

    kind: int  # primitives.F16 / BF16
    head_dim: int
    group: int
    paged: bool
    causal: bool
    hooks: AttentionHooks = DEFAULT_HOOKS

    def __post_init__(self) -> None:
        if self.kind not in (prim.F16, prim.BF16):
            raise InputError(f"the tensor-core prefill kernel takes float16 / bfloat16, got dtype code {self.kind}")
        if self.head_dim % 16 or self.head_dim <= 0:
            raise InputError(f"the tensor-core prefill kernel needs head_dim % 16 == 0, got {self.head_dim}")

    @property
    def q_tile(self) -> int:
        return query_tile_tokens(self.group)

    @property
    def heads_per_pass(self) -> int:
        return min(self.group, ROWS_PER_TILE)

    @property
    def kv_block(self) -> int:
        return prefill_mma_kv_block(self.head_dim)

    @property
    def threads(self) -> int:
        return WARP

    @property
    def block(self) -> tuple[int]:
        return (WARP,)

    @property
    def splittable(self) -> bool:
        return True


def make_prefill_mma_kernel(cfg: PrefillMmaConfig) -> Callable[..., Any]:
    """The plain Python kernel function for ``cfg`` (cuda.jit it to launch, compile_ptx to check)."""
    KIND, HEAD_DIM, GROUP, PAGED, CAUSAL = cfg.kind, cfg.head_dim, cfg.group, cfg.paged, cfg.causal
    HP, KB, NT, SIM = cfg.heads_per_pass, cfg.kv_block, WARP, SIMULATOR
    M = 16  # query rows per tile (one mma A block)
    CH = HEAD_DIM // 8  # 16-byte chunks per row
    RW = HEAD_DIM // 2  # int32 words per fp16/bf16 row
    SW = min(8, CH & -CH)  # the largest power of two dividing CH: the XOR stays inside the row
    KS = HEAD_DIM // 16  # k-steps of Q K^T
    NB = KB // 8  # n-blocks of S
    PK = KB // 16  # k-steps of P V
    DB = HEAD_DIM // 8  # n-blocks of O
    STAGE = KB * RW  # words per K (or V) stage
    Q_WORDS = M * RW
    QA, SA, OA = KS * 4, NB * 4, DB * 4  # fragment registers per lane: Q (A), S (C), O (C)
    KV_WORDS = 2 * STAGE  # two stages; the fp32 O staging (M * HEAD_DIM words) reuses the K ones
    WORDS8 = 4
    HALF_EXP = 0x7C00 if KIND == prim.F16 else 0x7F80
    hooks = cfg.hooks
    HAS_LOGITS_HOOK = hooks.logits_transform is not None
    HAS_MASK = hooks.logits_mask is not None
    HAS_Q_PAIR = hooks.query_pair_transform is not None
    HAS_K_PAIR = hooks.key_pair_transform is not None
    HAS_K_HOOK = HAS_K_PAIR or hooks.key_transform is not None
    HAS_SINK = hooks.sink is not None
    SOFTMAX = hooks.softmax
    NATURAL = HAS_LOGITS_HOOK or not SOFTMAX
    q_pair_hook = hooks.query_pair_transform or _identity_pair
    k_pair_hook = hooks.key_pair_transform or _identity_pair
    sink_hook = hooks.sink or _no_sink
    q_hook = hooks.query_transform or _identity_vec
    k_hook = hooks.key_transform or _identity_vec
    o_hook = hooks.output_transform or _identity_vec
    logit_hook = hooks.logits_transform or _identity_logit
    mask_hook = hooks.logits_mask or _no_mask
    mma = prim.mma_f16_16816 if KIND == prim.F16 else prim.mma_bf16_16816
    pack2 = prim.pack_f16x2 if KIND == prim.F16 else prim.pack_bf16x2
    unpack2 = prim.unpack_f16x2 if KIND == prim.F16 else prim.unpack_bf16x2
    ldsm, ldsm_t = prim.ldmatrix_x4, prim.ldmatrix_x4_trans
    load_row8, ex2, shfl_xor = prim.load_row8, prim.ex2, prim.shfl_xor_sync
    cp_async_16, cp_async_commit = prim.cp_async_16, prim.cp_async_commit
    wait_1, wait_0 = prim.cp_async_wait_group(1), prim.cp_async_wait_group(0)
    FULL = prim.FULL_MASK

    @cuda.jit(device=True, inline="always")
    def swz(row, chunk):
        """Word index of 16-byte chunk ``chunk`` of row ``row`` in a swizzled tile."""
        return row * RW + 4 * (chunk ^ (row & (SW - 1)))

    @cuda.jit(device=True, inline="always")
    def kv_row(request, t, kv_head, kv_indptr, kv_indices, page_stride, token_stride, head_stride, page_size, header):
        if PAGED:
            page = guarded_page(kv_indices, int64(kv_indptr[request]) + t // page_size, header, request)
            if page < 0:  # outside the pool (kernels/page_table.py): the caller reads nothing
                return int64(-1)
            return page * page_stride + (t % page_size) * token_stride + kv_head * head_stride
        return (int64(kv_indptr[request]) + t) * token_stride + kv_head * head_stride

    @cuda.jit(device=True, inline="always")
    def token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok):
        if use_positions != 0:
            return int64(row_qo_pos[row0 + tok])
        return qo_pos0 + tok

    @cuda.jit(device=True, inline="always")
    def load_block(sk, sv, stage, kb0, n_kv, request, kv_head, kv_indptr, kv_indices, k_words, v_words,
                   page_stride, token_stride, head_stride, page_size, params, kv_off, tid, v8, pair8, header):  # fmt: skip
        """Issue the copies of KV block kb0 (n_kv tokens; rows past them zero-filled) into ``stage``."""
        base = stage * STAGE
        for item in range(tid, KB * CH, NT):
            c = item // CH
            chunk = item - c * CH
            valid = c < n_kv
            row = int64(0)
            if valid:
                row = kv_row(request, kb0 + c, kv_head, kv_indptr, kv_indices, page_stride, token_stride, head_stride, page_size,
                             header)  # fmt: skip
                valid = row >= 0  # a page id outside the pool reads nothing: zero-filled (kernels/page_table.py)
                row = max(row, int64(0))
            dst = base + swz(c, chunk)
            cp_async_16(sv, dst, v_words, row + chunk * WORDS8, valid)
            if HAS_K_HOOK:
                for k in range(8):
                    v8[k] = float32(0.0)
                if valid:
                    load_row8(k_words, row + chunk * WORDS8, KIND, v8)
                    if HAS_K_PAIR:
                        load_row8(k_words, row + ((chunk * 8 + HEAD_DIM // 2) % HEAD_DIM // 8) * WORDS8, KIND, pair8)
                        k_pair_hook(v8, pair8, chunk * 8, HEAD_DIM, request, kv_head, kv_off + kb0 + c, params)
                    k_hook(v8, chunk * 8, request, kv_head, kv_off + kb0 + c, params)
                for k in range(4):
                    sk[dst + k] = pack2(v8[2 * k], v8[2 * k + 1])
            else:
                cp_async_16(sk, dst, k_words, row + chunk * WORDS8, valid)
        cp_async_commit()

    @cuda.jit(device=True, inline="always")
    def has_non_finite(sv, stage, tid):
        """This thread's share of V stage ``stage``: any Inf/NaN half?"""
        bad = 0
        for w in range(tid, STAGE, NT):
            word = sv[stage * STAGE + w]
            if (word & HALF_EXP) == HALF_EXP or ((word >> 16) & HALF_EXP) == HALF_EXP:
                bad = 1
        return bad

    def prefill_mma_kernel(
        header, cta_tile_indptr, tile_request, tile_q_start, tile_q_end, tile_kv_head, tile_kv_start, tile_kv_end,
        tile_slot, tile_slot_stride,
        qo_indptr, kv_indptr, kv_indices, kv_len,
        q_words, q_stride_n, q_stride_h,
        k_words, v_words, page_stride, token_stride, head_stride, page_size,
        out_words, lse, write_lse, partial_out, partial_lse,
        sm_scale, num_qo_heads, params,
        row_qo_pos, entry_kv_offset, use_positions,
    ):  # fmt: skip
        tid = cuda.threadIdx.x
        g = tid >> 2
        t4 = tid & 3
        if SIM:
            sq = cuda.shared.array(Q_WORDS, int32)
            sk = cuda.shared.array(KV_WORDS, int32)
            sv = cuda.shared.array(KV_WORDS, int32)
        else:
            sq = cuda.shared.array(Q_WORDS, int32, alignment=16)
            sk = cuda.shared.array(KV_WORDS, int32, alignment=16)
            sv = cuda.shared.array(KV_WORDS, int32, alignment=16)
        sp = cuda.shared.array((M, KB), float32)  # probabilities of the scalar P V path
        sm = cuda.shared.array(M, float32)
        sd = cuda.shared.array(M, float32)
        qa = cuda.local.array(QA, int32)
        s = cuda.local.array(SA, float32)
        o = cuda.local.array(OA, float32)
        km = cuda.local.array(SA, int32)  # 1: the score is kept (not masked / out of range)
        v8 = cuda.local.array(8, float32)
        pair8 = cuda.local.array(8, float32)
        # scores are scaled in fp32 after Q K^T: into the log2 domain, unless a hook needs natural units
        s_scale = float32(sm_scale) if NATURAL else float32(sm_scale * LOG2E)
        num_tiles = header[H_NUM_TILES]
        cta = cuda.blockIdx.x
        tile_stop = min(cta_tile_indptr[cta + 1], num_tiles)
        for tile in range(cta_tile_indptr[cta], tile_stop):
            request = int64(tile_request[tile])
            kv_head = int64(tile_kv_head[tile])
            q_start = int64(tile_q_start[tile])
            n_tok = int64(tile_q_end[tile]) - q_start
            kv_start = int64(tile_kv_start[tile])
            kv_end = int64(tile_kv_end[tile])
            slot = int64(tile_slot[tile])
            slot_stride = int64(tile_slot_stride[tile])
            qo_begin = int64(qo_indptr[request])
            qo_pos0 = int64(kv_len[request]) - (int64(qo_indptr[request + 1]) - qo_begin) + q_start
            row0 = qo_begin + q_start
            kv_off = int64(0)
            if use_positions != 0:
                kv_off = int64(entry_kv_offset[request])
            kv_stop = kv_end
            if CAUSAL:  # blocks past the last visible position are skipped
                last = token_pos(use_positions, row_qo_pos, row0, qo_pos0, int64(0))
                for tok in range(1, n_tok):
                    last = max(last, token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok))
                kv_stop = max(kv_start, min(kv_end, last - kv_off + 1))
            for head0 in range(0, GROUP, HP):
                # Q rows (hooks in fp32) -> fp16/bf16 swizzled tile; zeros for rows past the tile
                for item in range(tid, M * CH, NT):
                    r = item // CH
                    chunk = item - r * CH
                    tok = r // HP
                    head = head0 + r - tok * HP
                    for k in range(8):
                        v8[k] = float32(0.0)
                    if tok < n_tok and head < GROUP:
                        qo_head = kv_head * GROUP + head
                        q_row = (row0 + tok) * q_stride_n + qo_head * q_stride_h
                        load_row8(q_words, q_row + chunk * WORDS8, KIND, v8)
                        qo_pos = token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok)
                        if HAS_Q_PAIR:
                            load_row8(q_words, q_row + ((chunk * 8 + HEAD_DIM // 2) % HEAD_DIM // 8) * WORDS8, KIND, pair8)
                            q_pair_hook(v8, pair8, chunk * 8, HEAD_DIM, request, qo_head, qo_pos, params)
                        q_hook(v8, chunk * 8, request, qo_head, qo_pos, params)
                    w = swz(r, chunk)
                    for k in range(4):
                        sq[w + k] = pack2(v8[2 * k], v8[2 * k + 1])
                if kv_start < kv_stop:
                    load_block(sk, sv, 0, kv_start, min(int64(KB), kv_stop - kv_start), request, kv_head, kv_indptr,
                               kv_indices, k_words, v_words, page_stride, token_stride, head_stride, page_size,
                               params, kv_off, tid, v8, pair8, header)  # fmt: skip
                cuda.syncthreads()
                # A fragments of Q: matrices (rows 0-7 | 8-15) x (chunk 2ks | 2ks + 1)
                a_row = (tid & 7) + 8 * ((tid >> 3) & 1)
                for ks in range(KS):
                    f = ldsm(sq, swz(a_row, 2 * ks + (tid >> 4)))
                    for k in range(4):
                        qa[ks * 4 + k] = f[k]
                for k in range(DB * 4):
                    o[k] = float32(0.0)
                m0 = NEG_INF  # running max of rows g and g + 8 (log2 domain), lane-partial sums
                m1 = NEG_INF
                d0 = float32(0.0)
                d1 = float32(0.0)
                stage = 0
                for kb0 in range(kv_start, kv_stop, KB):
                    n_kv = min(int64(KB), kv_stop - kb0)
                    if kb0 + KB < kv_stop:  # the next block flies while this one is computed
                        load_block(sk, sv, 1 - stage, kb0 + KB, min(int64(KB), kv_stop - kb0 - KB), request, kv_head,
                                   kv_indptr, kv_indices, k_words, v_words, page_stride, token_stride, head_stride,
                                   page_size, params, kv_off, tid, v8, pair8, header)  # fmt: skip
                        wait_1()
                    else:
                        wait_0()
                    cuda.syncthreads()
                    kbase = stage * STAGE
                    # S = Q K^T: B fragments of n-block nb for k-steps 2j, 2j + 1 from one ldmatrix
                    for nb in range(NB):
                        for k in range(4):
                            s[nb * 4 + k] = float32(0.0)
                        for j in range(KS // 2):
                            f = ldsm(sk, kbase + swz(nb * 8 + (tid & 7), 4 * j + (tid >> 3)))
                            r = mma(qa[8 * j], qa[8 * j + 1], qa[8 * j + 2], qa[8 * j + 3], f[0], f[1],
                                    s[nb * 4], s[nb * 4 + 1], s[nb * 4 + 2], s[nb * 4 + 3])  # fmt: skip
                            r = mma(qa[8 * j + 4], qa[8 * j + 5], qa[8 * j + 6], qa[8 * j + 7], f[2], f[3],
                                    r[0], r[1], r[2], r[3])  # fmt: skip
                            for k in range(4):
                                s[nb * 4 + k] = r[k]
                        if KS % 2:
                            f = ldsm(sk, kbase + swz(nb * 8 + (tid & 7), 2 * (KS - 1) + ((tid >> 3) & 1)))
                            r = mma(qa[4 * (KS - 1)], qa[4 * (KS - 1) + 1], qa[4 * (KS - 1) + 2], qa[4 * (KS - 1) + 3],
                                    f[0], f[1], s[nb * 4], s[nb * 4 + 1], s[nb * 4 + 2], s[nb * 4 + 3])  # fmt: skip
                            for k in range(4):
                                s[nb * 4 + k] = r[k]
                    # scale, hooks, masks (selected: -inf), block max per row
                    masked_any = 0
                    mx0 = NEG_INF
                    mx1 = NEG_INF
                    for nb in range(NB):
                        for k in range(4):
                            rr = g + 8 * (k >> 1)
                            c = nb * 8 + 2 * t4 + (k & 1)
                            tok = rr // HP
                            head = head0 + rr - tok * HP
                            row_ok = tok < n_tok and head < GROUP
                            sc = s[nb * 4 + k] * s_scale
                            keep = row_ok and c < n_kv
                            if keep:
                                qo_pos = token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok)
                                kv_pos = kv_off + kb0 + c
                                qo_head = kv_head * GROUP + head
                                if HAS_LOGITS_HOOK:
                                    sc = float32(logit_hook(sc, request, qo_pos, kv_pos, qo_head, kv_head, params))
                                if NATURAL and SOFTMAX:
                                    sc = float32(sc * LOG2E)
                                if CAUSAL:
                                    keep = kv_pos <= qo_pos
                                if HAS_MASK:
                                    keep = keep and mask_hook(request, qo_pos, kv_pos, qo_head, kv_head, params)
                                if not keep:
                                    masked_any = 1
                            sc = sc if keep else NEG_INF
                            s[nb * 4 + k] = sc
                            km[nb * 4 + k] = 1 if keep else 0
                            if k < 2:
                                mx0 = nan_max(mx0, sc)
                            else:
                                mx1 = nan_max(mx1, sc)
                    # online softmax on the fragments: quad shuffles give the row max
                    scale0 = float32(1.0)
                    scale1 = float32(1.0)
                    if SOFTMAX:
                        mx0 = nan_max(mx0, shfl_xor(FULL, mx0, 1))
                        mx0 = nan_max(mx0, shfl_xor(FULL, mx0, 2))
                        mx1 = nan_max(mx1, shfl_xor(FULL, mx1, 1))
                        mx1 = nan_max(mx1, shfl_xor(FULL, mx1, 2))
                        n0 = nan_max(m0, mx0)
                        n1 = nan_max(m1, mx1)
                        if not (n0 == NEG_INF):
                            scale0 = ex2(m0 - n0)
                        if not (n1 == NEG_INF):
                            scale1 = ex2(m1 - n1)
                        m0 = n0
                        m1 = n1
                        d0 *= scale0
                        d1 *= scale1
                        for nb in range(NB):
                            for k in range(4):
                                sc = s[nb * 4 + k]
                                p = float32(0.0)
                                if not (sc == NEG_INF):
                                    p = ex2(sc - (m0 if k < 2 else m1))
                                s[nb * 4 + k] = p
                                if k < 2:
                                    d0 += p
                                else:
                                    d1 += p
                    else:
                        for k in range(NB * 4):
                            if s[k] == NEG_INF:
                                s[k] = float32(0.0)
                    for db in range(DB):
                        o[db * 4] *= scale0
                        o[db * 4 + 1] *= scale0
                        o[db * 4 + 2] *= scale1
                        o[db * 4 + 3] *= scale1
                    # a masked entry next to a non-finite V element: the scalar path (selection)
                    slow = 0
                    if CAUSAL or HAS_MASK:
                        masked_any = cuda.syncthreads_or(masked_any)
                        if masked_any != 0:
                            slow = cuda.syncthreads_or(has_non_finite(sv, stage, tid))
                    if slow != 0:
                        for nb in range(NB):
                            for k in range(4):
                                sp[g + 8 * (k >> 1), nb * 8 + 2 * t4 + (k & 1)] = s[nb * 4 + k] if km[nb * 4 + k] != 0 else NEG_INF
                        cuda.syncthreads()
                        for db in range(DB):
                            for k in range(4):
                                rr = g + 8 * (k >> 1)
                                dim = db * 8 + 2 * t4 + (k & 1)
                                acc = o[db * 4 + k]
                                for c in range(n_kv):
                                    p = sp[rr, c]
                                    if not (p == NEG_INF):  # masked: selected out
                                        lo, hi = unpack2(sv[kbase + swz(c, db) + t4])
                                        acc += p * (lo if (k & 1) == 0 else hi)
                                o[db * 4 + k] = acc
                    else:
                        # O += P V: P's C fragments of n-blocks 2j, 2j + 1 are the A fragment of k-step j
                        for j in range(PK):
                            a0 = pack2(s[8 * j], s[8 * j + 1])
                            a1 = pack2(s[8 * j + 2], s[8 * j + 3])
                            a2 = pack2(s[8 * j + 4], s[8 * j + 5])
                            a3 = pack2(s[8 * j + 6], s[8 * j + 7])
                            v_row = 16 * j + (tid & 7) + 8 * ((tid >> 3) & 1)
                            for db2 in range(DB // 2):
                                f = ldsm_t(sv, kbase + swz(v_row, 2 * db2 + (tid >> 4)))
                                r = mma(a0, a1, a2, a3, f[0], f[1], o[8 * db2], o[8 * db2 + 1], o[8 * db2 + 2], o[8 * db2 + 3])
                                for k in range(4):
                                    o[8 * db2 + k] = r[k]
                                r = mma(a0, a1, a2, a3, f[2], f[3], o[8 * db2 + 4], o[8 * db2 + 5], o[8 * db2 + 6], o[8 * db2 + 7])
                                for k in range(4):
                                    o[8 * db2 + 4 + k] = r[k]
                            if DB % 2:
                                f = ldsm_t(sv, kbase + swz(v_row, DB - 1))
                                r = mma(a0, a1, a2, a3, f[0], f[1], o[4 * (DB - 1)], o[4 * (DB - 1) + 1],
                                        o[4 * (DB - 1) + 2], o[4 * (DB - 1) + 3])  # fmt: skip
                                for k in range(4):
                                    o[4 * (DB - 1) + k] = r[k]
                    cuda.syncthreads()  # every lane is done with this stage before it is refilled
                    stage = 1 - stage
                # epilogue: row sums over the quad, O staged as fp32 rows in the (idle) K stages
                d0 += shfl_xor(FULL, d0, 1)
                d0 += shfl_xor(FULL, d0, 2)
                d1 += shfl_xor(FULL, d1, 1)
                d1 += shfl_xor(FULL, d1, 2)
                if t4 == 0:
                    sm[g] = m0
                    sm[g + 8] = m1
                    sd[g] = d0
                    sd[g + 8] = d1
                for db in range(DB):
                    for k in range(4):
                        sk[(g + 8 * (k >> 1)) * HEAD_DIM + db * 8 + 2 * t4 + (k & 1)] = prim.f32_to_bits(o[db * 4 + k])
                cuda.syncthreads()
                for item in range(tid, M * CH, NT):
                    r = item // CH
                    chunk = item - r * CH
                    dim0 = chunk * 8
                    tok = r // HP
                    head = head0 + r - tok * HP
                    if tok < n_tok and head < GROUP:
                        qo_head = kv_head * GROUP + head
                        lse_value = NEG_INF
                        for k in range(8):
                            v8[k] = float32(0.0)
                        if not SOFTMAX:
                            for k in range(8):
                                v8[k] = prim.bits_to_f32(sk[r * HEAD_DIM + dim0 + k])
                            lse_value = float32(0.0)
                        else:
                            m_row = sm[r]
                            d = sd[r]
                            rescale = float32(1.0)
                            if HAS_SINK and slot < 0:
                                sink = float32(sink_hook(qo_head, params) * LOG2E)
                                if not (sink == NEG_INF):
                                    m_new = nan_max(m_row, sink)
                                    rescale = ex2(m_row - m_new)
                                    d = d * rescale + ex2(sink - m_new)
                                    m_row = m_new
                            if d > float32(0.0) or d != d:
                                inv = rescale / d
                                for k in range(8):
                                    v8[k] = prim.bits_to_f32(sk[r * HEAD_DIM + dim0 + k]) * inv
                                lse_value = float32((m_row + math.log2(d)) * LN2)
                        if slot < 0:
                            o_hook(v8, dim0, request, qo_head, token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok), params)
                            out_row = (row0 + tok) * num_qo_heads + qo_head
                            prim.store_row8(out_words, out_row * RW + chunk * WORDS8, KIND, v8)
                            if dim0 == 0 and write_lse != 0:
                                lse[out_row] = lse_value
                        else:
                            part_row = (slot + tok * slot_stride) * GROUP + head
                            for k in range(8):
                                partial_out[part_row * HEAD_DIM + dim0 + k] = v8[k]
                            if dim0 == 0:
                                partial_lse[part_row] = lse_value
                cuda.syncthreads()

    return PREFILL_ARGS.check(prefill_mma_kernel)


@lru_cache(maxsize=None)
def prefill_mma_kernel(cfg: PrefillMmaConfig) -> Any:
    """The launchable kernel for ``cfg``: compiled once per process (on first launch)."""
    return cuda.jit(make_prefill_mma_kernel(cfg), fastmath=fastmath_flags())


def gpu_compile_specs() -> list[CompileSpec]:
    """The benchmark shape (bf16 hd128 g4 paged causal), fp16 hd64 ragged full, and a hooked variant."""
    from .compile_spec import PREFILL_CHECK_HOOKS as CHECK_HOOKS
    from .compile_spec import CompileSpec, PerfHints

    cases = [
        (prim.BF16, 128, 4, True, True, DEFAULT_HOOKS),
        (prim.F16, 64, 1, False, False, DEFAULT_HOOKS),
        (prim.F16, 64, 8, True, True, CHECK_HOOKS),
    ]
    specs = []
    for kind, head_dim, group, paged, causal, hooks in cases:
        cfg = PrefillMmaConfig(kind, head_dim, group, paged, causal, hooks)
        ab = "f16" if kind == prim.F16 else "bf16"
        label = hooks.name.split("#")[0]
        specs.append(
            CompileSpec(
                name=f"prefill_mma[{DTYPE_NAMES[kind]},hd{head_dim},g{group},{'paged' if paged else 'ragged'},{'causal' if causal else 'full'},{label}]",
                pyfunc=make_prefill_mma_kernel(cfg),
                signature=PREFILL_ARGS.signature,
                expect=(f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32", "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "cp.async.cg.shared.global", NAN_PTX),  # fmt: skip
                fastmath=fastmath_flags(),
                perf=PerfHints(threads=cfg.threads, ctas_per_sm=2, bound="compute"),
            )
        )
    return specs


def tensor_core_config(kind: int, head_dim: int, group: int, paged: bool, causal: bool,
                       hooks: AttentionHooks = DEFAULT_HOOKS) -> PrefillMmaConfig | None:  # fmt: skip
    """The tensor-core specialization BatchPrefill launches, or None for the CUDA-core kernel: fp32,
    head_dim % 16 != 0, and variants that transform q or k (their transformed values would be rounded
    to fp16/bf16 for the mma; the CUDA-core kernel keeps them fp32) stay on CUDA cores."""
    transforms = (hooks.query_transform, hooks.key_transform, hooks.query_pair_transform, hooks.key_pair_transform)
    if kind not in (prim.F16, prim.BF16) or head_dim % 16 or any(h is not None for h in transforms):
        return None
    return PrefillMmaConfig(kind, head_dim, group, paged, causal, hooks)
