"""Batch prefill on tensor cores (fp16 / bf16): mma.sync m16n8k16 over the prefill plan's tiles.

Same launch contract as ``kernels.prefill`` (PREFILL_ARGS, the plan of planner/prefill_layout.py,
slots and slot strides of split tiles, caller positions, natural-log LSE, every AttentionHooks
field); fp32 stays on the CUDA-core kernel. Launch shape (kernels.tuning.prefill_mma_shape): W warps,
each owning 16 query rows, so a pass covers R = 16 W rows of (token x GQA head) -- 128 rows up to
head_dim 64, 64 up to 128 on a GPU; 16 on the simulator. A plan tile (the tuning table's tile rows,
or any other size) runs as passes of R // HP tokens x HP heads; per pass:

    Q   rows -> registers (query hooks) -> fp16/bf16 shared tile (swizzled, in the KV stage words)
        -> A fragments (ldmatrix) held in registers for the whole pass; past head_dim 128
        (``q_shared``) the tile keeps words of its own and each S tile re-reads its A fragments
        (4 x head_dim / 16 registers a lane next to O's head_dim / 2 would spill: 344 bytes at 256)
    K/V blocks of KB tokens -> shared by cp.async (16 B, zero-filled past the range), 2 stages shared
        by all W warps: block j + 1 is in flight while block j is computed (one commit group each)
        (key hooks: K goes through registers instead, V still by cp.async); a row whose page id the
        guard refused reads nothing and is flagged, and a block holding one (a barrier-OR) masks it
    per S tile of SB tokens of the block (SB = KB, or a divisor: 64-token blocks at head_dim 128 are
    computed as two 32-token tiles, so S stays in registers while a stage's copies double):
    S = Q K^T per warp: B fragments by ldmatrix from the K rows, fp32 accumulators; scale, logits
        hook, causal / hook / range masks SELECT -inf; online softmax on the C fragments (row max and
        sum over the quad by shuffles, max.NaN); P packed to A fragments in registers
    O += P V: B fragments by ldmatrix.trans from the V rows, O in C fragments (fp32)
    epilogue: O (normalized) staged as fp32 rows in the (idle) KV stage words, then written by
        8-vectors exactly like the CUDA-core kernel (sink, output hook, LSE, partial slots).

A warp whose 16 rows lie past the pass's rows (a short query) skips the math (warp-uniform) but
still issues its share of the copies and meets every barrier.

Shared memory: one int32 word array of 4 stages x KB rows of HEAD_DIM / 8 16-byte chunks (K stage
0, 1, then V stage 0, 1) and the refused-row flags: 4 KB HEAD_DIM 2 bytes, *dynamic* shared memory
whose size the launch passes (``PrefillMmaConfig.dynamic_shared_bytes``; 64 KB at head_dim 128, past
the 48 KB a CTA may hold statically, so a GPU launch first opts the compiled kernel in:
kernels.launch.opt_in_shared_memory); the per-row max and sum are static.
Chunk c of row r is stored at chunk c ^ (r mod SW) (``swizzle_chunks``): the 128-byte XOR swizzle
(SW = 8) for rows of >= 128 bytes with head_dim / 8 a multiple of 8; smaller or odd head dims
swizzle within the largest power of two of chunks dividing the row (32 -> 64-byte swizzle, 16 ->
32-byte, 48 -> 32-byte), so the 8 rows one ldmatrix phase reads hit distinct bank groups where the
row allows it.

Causal: KV blocks past the pass's last visible position are skipped (tiles above the diagonal
never load), the diagonal block is masked. NaN: a masked / out-of-range score is selected out; P V
is a product, so an S tile that has a masked entry AND a non-finite V element takes a CUDA-core
path that skips masked positions (0 * Inf must not reach a row), its weights staged in the tile's
own K rows (S is done with them; the stage's next tile's rows are untouched). Fragment arrays are indexed at compile-time positions only: no local memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

from numba import float32, int32, int64

from tilegraph._device import SIMULATOR, cuda
from tilegraph.errors import InputError
from tilegraph.planner.layout import H_NUM_PAGES, H_NUM_TILES

from . import primitives as prim
from .hooks import DEFAULT_HOOKS, DTYPE_NAMES, LN2, LOG2E, NEG_INF, AttentionHooks
from .hooks import identity_logit as _identity_logit
from .hooks import identity_pair as _identity_pair
from .hooks import identity_vec as _identity_vec
from .hooks import no_mask as _no_mask
from .hooks import no_sink as _no_sink
from .nan import MAX_NAN_PTX, fastmath_flags
from .page_table import guarded_page
from .prefill import PREFILL_ARGS
from .tuning import (PrefillMmaShape, decode_tensor_ctas_per_sm, prefill_mma_score_tokens, prefill_mma_shape,
                     prefill_mma_short_shape)  # fmt: skip

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

    #: warps of the CTA, each owning 16 query rows of a pass (0: the tuning table's choice)
    warps: int = 0
    #: KV tokens per shared-memory stage (0: the tuning table's choice; a multiple of 16)
    kv_tokens: int = 0
    #: KV tokens per S = Q K^T tile, a multiple of 16 dividing kv_tokens (0:
    #: kernels.tuning.prefill_mma_score_tokens: 32 at head_dim 128, so S stays in registers)
    score_tokens: int = 0
    #: Q's A fragments re-read from a shared Q tile at each S tile instead of held in registers for
    #: the pass (None: for head_dim > 128, where Q's 4 x head_dim / 16 registers next to O's head_dim / 2
    #: would spill)
    q_in_shared: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in (prim.F16, prim.BF16):
            raise InputError(f"the tensor-core prefill kernel takes float16 / bfloat16, got dtype code {self.kind}")
        if self.head_dim % 16 or self.head_dim <= 0:
            raise InputError(f"the tensor-core prefill kernel needs head_dim % 16 == 0, got {self.head_dim}")
        if self.warps < 0 or self.kv_tokens < 0 or self.kv_tokens % 16:
            raise InputError(f"warps must be >= 0 and kv_tokens a multiple of 16, got {self.warps}, {self.kv_tokens}")
        if self.score_tokens < 0 or self.score_tokens % 16 or self.kv_block % self.score_block:
            raise InputError(f"score_tokens must be a multiple of 16 dividing kv_tokens {self.kv_block}, got {self.score_tokens}")
        if self.rows > 2 * self.kv_block or 16 * self.rows > self.score_block * self.head_dim:
            raise InputError(f"{self.rows} query rows need kv_tokens >= {self.rows // 2} and score_tokens x head_dim >= "
                             f"{16 * self.rows} (Q, O and the selected path's weights are staged in the KV stages)")

    @property
    def shape(self) -> PrefillMmaShape:
        """The tuning table's launch shape with this config's overrides."""
        base = prefill_mma_shape(self.head_dim)
        kv_tokens = self.kv_tokens or base.kv_tokens
        score_tokens = self.score_tokens or prefill_mma_score_tokens(kv_tokens, self.head_dim)
        return PrefillMmaShape(self.warps or base.warps, kv_tokens, score_tokens)

    @property
    def rows(self) -> int:
        """Query rows (tokens x GQA heads) of one pass: 16 per warp."""
        return 16 * self.shape.warps

    @property
    def q_tile(self) -> int:
        """Query tokens one pass covers (the planner's tiles may hold more: the kernel loops)."""
        return max(1, self.rows // self.group)

    @property
    def heads_per_pass(self) -> int:
        return min(self.group, self.rows)

    @property
    def kv_block(self) -> int:
        return self.shape.kv_tokens

    @property
    def q_shared(self) -> bool:
        """Whether the pass's Q tile stays in shared memory (its own words) for the S tiles to read."""
        return self.head_dim > 128 if self.q_in_shared is None else self.q_in_shared

    @property
    def score_block(self) -> int:
        """KV tokens of one S tile (a stage holds kv_block // score_block of them)."""
        return self.shape.score_tokens

    @property
    def row_threads(self) -> int:
        """Threads sharing one KV row in load_block (each looks its page up once per block and copies
        every row_threads-th 16-byte chunk): the largest power of two <= threads / kv_block and
        <= the row's chunks that divides them."""
        chunks = self.head_dim // 8
        most = min(max(self.threads // self.kv_block, 1), chunks)
        tpr = 1
        while tpr * 2 <= most and chunks % (tpr * 2) == 0:
            tpr *= 2
        return tpr

    @property
    def issue_trips(self) -> int:
        """Rows each thread issues per KV block in load_block (1 at the GPU shapes)."""
        return -(-self.kv_block * self.row_threads // self.threads)

    @property
    def threads(self) -> int:
        return WARP * self.shape.warps

    @property
    def block(self) -> tuple[int]:
        return (self.threads,)

    @property
    def splittable(self) -> bool:
        return True

    @property
    def dynamic_shared_bytes(self) -> int:
        """Dynamic shared memory of a launch: K and V, two stages each, the refused-row flags of the
        two stages (paged) and, with ``q_shared``, the Q tile. Past STATIC_SHARED_BYTES the launch
        opts in (kernels.launch)."""
        flags = 2 * 4 * self.kv_block if self.paged else 0
        q_tile = self.rows * self.head_dim * 2 if self.q_shared else 0
        return 4 * self.kv_block * self.head_dim * 2 + flags + q_tile

    @property
    def shared_bytes(self) -> int:
        """Shared memory of a CTA: the dynamic words plus the static per-row max and sum."""
        return self.dynamic_shared_bytes + 2 * 4 * self.rows


def swizzle_chunks(head_dim: int) -> int:
    """XOR width (in 16-byte chunks) of the shared tiles: chunk c of row r sits at c ^ (r mod SW).
    head_dim >= 64 with head_dim / 8 a multiple of 8 (rows of >= 128 bytes): the 128-byte swizzle,
    SW = 8. Smaller or odd head dims: SW = the largest power of two dividing head_dim / 8 (64 -> 8,
    32 -> 4, 16 -> 2, 48 -> 2), a 16 * SW-byte swizzle that stays inside the row; the 8 rows one
    ldmatrix phase reads then meet in at most 8 / SW bank groups (a 2-way conflict at head_dim 32)."""
    chunks = head_dim // 8
    return min(8, chunks & -chunks)


def make_prefill_mma_kernel(cfg: PrefillMmaConfig) -> Callable[..., Any]:
    """The plain Python kernel function for ``cfg`` (cuda.jit it to launch, compile_ptx to check)."""
    KIND, HEAD_DIM, GROUP, PAGED, CAUSAL = cfg.kind, cfg.head_dim, cfg.group, cfg.paged, cfg.causal
    HP, KB, NT, SIM = cfg.heads_per_pass, cfg.kv_block, cfg.threads, SIMULATOR
    R = cfg.rows  # query rows of one pass: 16 per warp
    TPR, ROW_TRIPS = cfg.row_threads, cfg.issue_trips  # load_block: threads per KV row, rows per thread
    TP = R // HP  # query tokens of one pass
    CH = HEAD_DIM // 8  # 16-byte chunks per row
    RW = HEAD_DIM // 2  # int32 words per fp16/bf16 row
    SW = swizzle_chunks(HEAD_DIM)  # the XOR stays inside the row
    KS = HEAD_DIM // 16  # k-steps of Q K^T
    SB = cfg.score_block  # KV tokens of one S tile; a stage holds SUBS of them
    SUBS = KB // SB
    NB = SB // 8  # n-blocks of S
    PK = SB // 16  # k-steps of P V
    DB = HEAD_DIM // 8  # n-blocks of O
    STAGE = KB * RW  # words per K (or V) stage
    V_BASE = 2 * STAGE
    REFUSED_BASE = 4 * STAGE  # paged: per stage, KB words flagging rows whose page id the guard refused
    # K and V, two stages each (Q (R * RW) and fp32 O (R * HEAD_DIM) fit: R <= 2 KB), the refused flags
    Q_SHARED = cfg.q_shared
    # the Q tile: its own words after the flags (Q_SHARED), else staged in the KV stage words while
    # its fragments are loaded into registers
    Q_BASE = 4 * STAGE + (2 * KB if PAGED else 0) if Q_SHARED else 0
    SMEM_WORDS = cfg.dynamic_shared_bytes // 4
    assert SMEM_WORDS == 4 * STAGE + (2 * KB if PAGED else 0) + (R * RW if Q_SHARED else 0)
    QA, SA, OA = KS * 4, NB * 4, DB * 4  # fragment registers per lane: Q (A), S (C), O (C)
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
    # interior KV blocks skip the per-entry mask code when no hook can mask or transform a score
    FAST_BLOCKS = not HAS_MASK and not HAS_LOGITS_HOOK
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
    load_row8, ex2, shfl_xor, max_nan = prim.load_row8, prim.ex2, prim.shfl_xor_sync, prim.max_nan
    cp_async_16, cp_async_commit = prim.cp_async_16, prim.cp_async_commit
    wait_1, wait_0 = prim.cp_async_wait_group(1), prim.cp_async_wait_group(0)
    FULL = prim.FULL_MASK

    @cuda.jit(device=True, inline="always")
    def swz(row, chunk):
        """Word index of 16-byte chunk ``chunk`` of row ``row`` in a swizzled tile."""
        return row * RW + 4 * (chunk ^ (row & (SW - 1)))

    @cuda.jit(device=True, inline="always")
    def kv_page_id(request, page_index, kv_indptr, kv_indices, header):
        """The id of page ``page_index`` (request-local) of ``request``: the ONE place this kernel
        reads the page table, through the guard (kernels/page_table.py): -1 for an id outside the pool."""
        return guarded_page(kv_indices, int64(kv_indptr[request]) + page_index, header[H_NUM_PAGES], header, request)

    @cuda.jit(device=True, inline="always")
    def kv_row(request, t, kv_head, kv_indptr, kv_indices, header, page_stride, token_stride, head_stride, pdiv):
        if PAGED:
            # t is request-local (< 2**31); pdiv = (page_size, magic, shift) of page_divisor: a shift
            # for a power-of-two page_size, else a multiply-shift -- no division
            page_size, magic, shift = pdiv
            t32 = int32(t)
            if magic == 0:
                page_index = int32(t32 >> shift)
            else:
                page_index = int32((int64(t32) * magic) >> shift)
            page = kv_page_id(request, page_index, kv_indptr, kv_indices, header)
            if page < 0:  # outside the pool: the caller reads nothing
                return int64(-1)
            in_page = t32 - page_index * int32(page_size)
            return page * page_stride + int64(in_page) * token_stride + kv_head * head_stride
        return (int64(kv_indptr[request]) + t) * token_stride + kv_head * head_stride

    @cuda.jit(device=True, inline="always")
    def token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok):
        if use_positions != 0:
            return int64(row_qo_pos[row0 + tok])
        return qo_pos0 + tok

    @cuda.jit(device=True, inline="always")
    def load_block(skv, stage, kb0, n_kv, request, kv_head, kv_indptr, kv_indices, header, k_words, v_words,
                   page_stride, token_stride, head_stride, pdiv, params, kv_off, tid, v8, pair8):  # fmt: skip
        """Issue the copies of KV block kb0 (n_kv tokens; rows past them zero-filled) into ``stage``
        (K words at stage * STAGE, V words at (2 + stage) * STAGE). Paged: a row whose page id the
        guard refused reads nothing and is flagged at REFUSED_BASE + stage * KB (every row's flag is
        written); returns 1 when this thread flagged one (the consumer ORs it over the CTA)."""
        base = stage * STAGE
        refused = 0
        row_of_thread = tid // TPR  # TPR threads per row: one page lookup each, chunks TPR apart
        first_chunk = tid - row_of_thread * TPR
        for trip in range(ROW_TRIPS):
            c = row_of_thread + trip * (NT // TPR)
            if c < KB:
                valid = c < n_kv
                row = int64(0)
                if valid:
                    row = kv_row(request, kb0 + c, kv_head, kv_indptr, kv_indices, header, page_stride, token_stride,
                                 head_stride, pdiv)  # fmt: skip
                    valid = row >= 0  # a page id outside the pool reads nothing (kernels/page_table.py) ...
                    row = max(row, int64(0))
                if PAGED and first_chunk == 0:  # ... and its row is masked by refuse_scores
                    refused_row = 1 if c < n_kv and not valid else 0
                    skv[REFUSED_BASE + stage * KB + c] = refused_row
                    refused = max(refused, refused_row)
                for j in range(CH // TPR):
                    chunk = first_chunk + j * TPR
                    dst = base + swz(c, chunk)
                    cp_async_16(skv, V_BASE + dst, v_words, row + chunk * WORDS8, valid)
                    if HAS_K_HOOK:
                        for k in range(8):
                            v8[k] = float32(0.0)
                        if valid:
                            load_row8(k_words, row + chunk * WORDS8, KIND, v8)
                            if HAS_K_PAIR:
                                load_row8(k_words, row + ((chunk * 8 + HEAD_DIM // 2) % HEAD_DIM // 8) * WORDS8, KIND,
                                          pair8)  # fmt: skip
                                k_pair_hook(v8, pair8, chunk * 8, HEAD_DIM, request, kv_head, kv_off + kb0 + c, params)
                            k_hook(v8, chunk * 8, request, kv_head, kv_off + kb0 + c, params)
                        for k in range(4):
                            skv[dst + k] = pack2(v8[2 * k], v8[2 * k + 1])
                    else:
                        cp_async_16(skv, dst, k_words, row + chunk * WORDS8, valid)
        cp_async_commit()
        return refused

    @cuda.jit(device=True, inline="always")
    def has_non_finite(skv, vbase, tid):
        """This thread's share of the S tile's V rows (at word ``vbase``): any Inf/NaN half?"""
        bad = 0
        for w in range(tid, SB * RW, NT):
            word = skv[vbase + w]
            if (word & HALF_EXP) == HALF_EXP or ((word >> 16) & HALF_EXP) == HALF_EXP:
                bad = 1
        return bad

    @cuda.jit(device=True, inline="always")
    def stage_q(skv, v8, pair8, tid, request, kv_head, n_tok, tok0, head0, row0, qo_pos0, q_words,
                q_stride_n, q_stride_h, params, row_qo_pos, use_positions):  # fmt: skip
        """The pass's R query rows (query hooks in fp32) -> fp16/bf16 swizzled tile at word Q_BASE;
        zeros for rows past the pass."""
        for item in range(tid, R * CH, NT):
            r = item // CH
            chunk = item - r * CH
            tok = r // HP
            head = head0 + r - tok * HP
            for k in range(8):
                v8[k] = float32(0.0)
            if tok < n_tok and head < GROUP:
                qo_head = kv_head * GROUP + head
                q_row = (row0 + tok0 + tok) * q_stride_n + qo_head * q_stride_h
                load_row8(q_words, q_row + chunk * WORDS8, KIND, v8)
                qo_pos = token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok0 + tok)
                if HAS_Q_PAIR:
                    load_row8(q_words, q_row + ((chunk * 8 + HEAD_DIM // 2) % HEAD_DIM // 8) * WORDS8, KIND, pair8)
                    q_pair_hook(v8, pair8, chunk * 8, HEAD_DIM, request, qo_head, qo_pos, params)
                q_hook(v8, chunk * 8, request, qo_head, qo_pos, params)
            w = Q_BASE + swz(r, chunk)
            for k in range(4):
                skv[w + k] = pack2(v8[2 * k], v8[2 * k + 1])

    @cuda.jit(device=True, inline="always")
    def q_fragments(skv, qa, lane, wrow):
        """A fragments of this warp's 16 Q rows: matrices (rows 0-7 | 8-15) x (chunk 2ks | 2ks + 1)."""
        a_row = wrow + (lane & 7) + 8 * ((lane >> 3) & 1)
        for ks in range(KS):
            f = ldsm(skv, swz(a_row, 2 * ks + (lane >> 4)))
            for k in range(4):
                qa[ks * 4 + k] = f[k]

    @cuda.jit(device=True, inline="always")
    def scores_q_shared(skv, qa, s, kbase, lane, wrow):
        """S = Q K^T with Q's A fragments read from the shared Q tile per k-step pair (``q_shared``):
        two ldmatrix for A, then per n-block one for B and two mma. ``qa`` is indexed by k-step as in
        ``scores`` (so the loops unroll, as there), but each pair is live only for its own mma."""
        a_row = wrow + (lane & 7) + 8 * ((lane >> 3) & 1)
        for e in range(SA):
            s[e] = float32(0.0)
        for j in range(KS // 2):
            f = ldsm(skv, Q_BASE + swz(a_row, 4 * j + (lane >> 4)))
            for k in range(4):
                qa[8 * j + k] = f[k]
            f = ldsm(skv, Q_BASE + swz(a_row, 4 * j + 2 + (lane >> 4)))
            for k in range(4):
                qa[8 * j + 4 + k] = f[k]
            for nb in range(NB):
                f = ldsm(skv, kbase + swz(nb * 8 + (lane & 7), 4 * j + (lane >> 3)))
                r = mma(qa[8 * j], qa[8 * j + 1], qa[8 * j + 2], qa[8 * j + 3], f[0], f[1],
                        s[nb * 4], s[nb * 4 + 1], s[nb * 4 + 2], s[nb * 4 + 3])  # fmt: skip
                r = mma(qa[8 * j + 4], qa[8 * j + 5], qa[8 * j + 6], qa[8 * j + 7], f[2], f[3], r[0], r[1], r[2], r[3])
                for k in range(4):
                    s[nb * 4 + k] = r[k]
        if KS % 2:
            f = ldsm(skv, Q_BASE + swz(a_row, 2 * (KS - 1) + (lane >> 4)))
            for k in range(4):
                qa[4 * (KS - 1) + k] = f[k]
            for nb in range(NB):
                f = ldsm(skv, kbase + swz(nb * 8 + (lane & 7), 2 * (KS - 1) + ((lane >> 3) & 1)))
                r = mma(qa[4 * (KS - 1)], qa[4 * (KS - 1) + 1], qa[4 * (KS - 1) + 2], qa[4 * (KS - 1) + 3], f[0], f[1],
                        s[nb * 4], s[nb * 4 + 1], s[nb * 4 + 2], s[nb * 4 + 3])  # fmt: skip
                for k in range(4):
                    s[nb * 4 + k] = r[k]

    @cuda.jit(device=True, inline="always")
    def scores(skv, qa, s, kbase, lane):
        """S = Q K^T for this warp's rows: B fragments of n-block nb for k-steps 2j, 2j + 1 from one ldmatrix."""
        for nb in range(NB):
            for k in range(4):
                s[nb * 4 + k] = float32(0.0)
            for j in range(KS // 2):
                f = ldsm(skv, kbase + swz(nb * 8 + (lane & 7), 4 * j + (lane >> 3)))
                r = mma(qa[8 * j], qa[8 * j + 1], qa[8 * j + 2], qa[8 * j + 3], f[0], f[1],
                        s[nb * 4], s[nb * 4 + 1], s[nb * 4 + 2], s[nb * 4 + 3])  # fmt: skip
                r = mma(qa[8 * j + 4], qa[8 * j + 5], qa[8 * j + 6], qa[8 * j + 7], f[2], f[3], r[0], r[1], r[2], r[3])
                for k in range(4):
                    s[nb * 4 + k] = r[k]
            if KS % 2:
                f = ldsm(skv, kbase + swz(nb * 8 + (lane & 7), 2 * (KS - 1) + ((lane >> 3) & 1)))
                r = mma(qa[4 * (KS - 1)], qa[4 * (KS - 1) + 1], qa[4 * (KS - 1) + 2], qa[4 * (KS - 1) + 3],
                        f[0], f[1], s[nb * 4], s[nb * 4 + 1], s[nb * 4 + 2], s[nb * 4 + 3])  # fmt: skip
                for k in range(4):
                    s[nb * 4 + k] = r[k]

    @cuda.jit(device=True, inline="always")
    def mask_scores(s, km, g, t4, wrow, s_scale, n_tok, tok0, head0, n_kv, kb0, request, kv_head, qo_pos0,
                    row0, kv_off, params, row_qo_pos, use_positions):  # fmt: skip
        """Scale, logits hook, causal / hook / range masks (selected: -inf). Returns (any masked, row
        max of g, row max of g + 8) over this lane's fragment entries."""
        masked_any = 0
        mx0 = NEG_INF
        mx1 = NEG_INF
        # the two rows of this lane: token, head, whether they exist, their position (once per block)
        tok_a = (wrow + g) // HP
        head_a = head0 + wrow + g - tok_a * HP
        tok_b = (wrow + g + 8) // HP
        head_b = head0 + wrow + g + 8 - tok_b * HP
        ok_a = tok_a < n_tok and head_a < GROUP
        ok_b = tok_b < n_tok and head_b < GROUP
        pos_a = token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok0 + tok_a) if ok_a else int64(0)
        pos_b = token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok0 + tok_b) if ok_b else int64(0)
        if FAST_BLOCKS and ok_a and ok_b and n_kv == SB and (not CAUSAL or kv_off + kb0 + SB - 1 <= min(pos_a, pos_b)):
            # an interior block (both rows exist, every column in range and at or before both rows'
            # positions): nothing to mask, the scores are only scaled
            for e in range(SA):
                sc = s[e] * s_scale
                s[e] = sc
                km[e] = 1
                if (e & 2) != 0:
                    mx1 = max_nan(mx1, sc)
                else:
                    mx0 = max_nan(mx0, sc)
            return masked_any, mx0, mx1
        for e in range(SA):  # one flat loop over the fragment's entries (unrolled: static indices)
            upper = (e & 2) != 0
            c = (e >> 2) * 8 + 2 * t4 + (e & 1)
            keep = (ok_b if upper else ok_a) and c < n_kv
            sc = s[e] * s_scale
            if keep:
                qo_pos = pos_b if upper else pos_a
                kv_pos = kv_off + kb0 + c
                qo_head = kv_head * GROUP + (head_b if upper else head_a)
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
            s[e] = sc
            km[e] = 1 if keep else 0
            if upper:
                mx1 = max_nan(mx1, sc)
            else:
                mx0 = max_nan(mx0, sc)
        return masked_any, mx0, mx1

    @cuda.jit(device=True, inline="always")
    def refuse_scores(skv, s, km, flags, t4):
        """Mask the columns of rows whose page id the guard refused (the S tile's flags at word
        ``flags``): -inf, not
        kept. Returns the recomputed (row max of g, row max of g + 8). Runs only in a block holding
        such a row (CTA-uniform), so the common path pays one barrier-OR per block."""
        mx0 = NEG_INF
        mx1 = NEG_INF
        for e in range(SA):
            c = (e >> 2) * 8 + 2 * t4 + (e & 1)
            if skv[flags + c] != 0:
                s[e] = NEG_INF
                km[e] = 0
            if (e & 2) != 0:
                mx1 = max_nan(mx1, s[e])
            else:
                mx0 = max_nan(mx0, s[e])
        return mx0, mx1

    @cuda.jit(device=True, inline="always")
    def pv_mma(skv, s, o, vbase, lane):
        """O += P V: P's C fragments of n-blocks 2j, 2j + 1 are the A fragment of k-step j."""
        for j in range(PK):
            a0 = pack2(s[8 * j], s[8 * j + 1])
            a1 = pack2(s[8 * j + 2], s[8 * j + 3])
            a2 = pack2(s[8 * j + 4], s[8 * j + 5])
            a3 = pack2(s[8 * j + 6], s[8 * j + 7])
            v_row = 16 * j + (lane & 7) + 8 * ((lane >> 3) & 1)
            for db2 in range(DB // 2):
                f = ldsm_t(skv, vbase + swz(v_row, 2 * db2 + (lane >> 4)))
                r = mma(a0, a1, a2, a3, f[0], f[1], o[8 * db2], o[8 * db2 + 1], o[8 * db2 + 2], o[8 * db2 + 3])
                for k in range(4):
                    o[8 * db2 + k] = r[k]
                r = mma(a0, a1, a2, a3, f[2], f[3], o[8 * db2 + 4], o[8 * db2 + 5], o[8 * db2 + 6], o[8 * db2 + 7])
                for k in range(4):
                    o[8 * db2 + 4 + k] = r[k]
            if DB % 2:
                f = ldsm_t(skv, vbase + swz(v_row, DB - 1))
                r = mma(a0, a1, a2, a3, f[0], f[1], o[4 * (DB - 1)], o[4 * (DB - 1) + 1],
                        o[4 * (DB - 1) + 2], o[4 * (DB - 1) + 3])  # fmt: skip
                for k in range(4):
                    o[4 * (DB - 1) + k] = r[k]

    @cuda.jit(device=True, inline="always")
    def pv_selected(skv, s, km, o, kbase, vbase, lane, wrow, g, t4, n_kv, live):
        """O += P V on CUDA cores, masked positions selected out (0 * Inf must not reach a row); every
        thread of the CTA calls it. Per n-block, each warp writes its 16 x 8 weights (masked: -inf)
        into its rows of a scratch tile in the current S tile's K rows (free: S is done), then reads them
        back by column. The fragment registers are read at compile-time indices only (a flat loop),
        so they stay registers (a run-time index would move them to local memory)."""
        for nb in range(NB):
            if live:
                for e in range(SA):
                    if (e >> 2) == nb:
                        w = kbase + (wrow + g + 8 * ((e >> 1) & 1)) * 8 + 2 * t4 + (e & 1)
                        skv[w] = prim.f32_to_bits(s[e] if km[e] != 0 else NEG_INF)
            cuda.syncthreads()
            if live:
                for cc in range(min(int64(8), n_kv - nb * 8)):
                    c = nb * 8 + cc
                    p0 = prim.bits_to_f32(skv[kbase + (wrow + g) * 8 + cc])
                    p1 = prim.bits_to_f32(skv[kbase + (wrow + g + 8) * 8 + cc])
                    for db in range(DB):
                        lo, hi = unpack2(skv[vbase + swz(c, db) + t4])
                        if not (p0 == NEG_INF):
                            o[db * 4] += p0 * lo
                            o[db * 4 + 1] += p0 * hi
                        if not (p1 == NEG_INF):
                            o[db * 4 + 2] += p1 * lo
                            o[db * 4 + 3] += p1 * hi
            cuda.syncthreads()

    @cuda.jit(device=True, inline="always")
    def softmax_block(s, o, m0, m1, d0, d1, mx0, mx1):
        """Online softmax on the C fragments (quad shuffles give the row max): s <- P, O and the
        lane-partial sums rescaled. Returns the new (m0, m1, d0, d1)."""
        scale0 = float32(1.0)
        scale1 = float32(1.0)
        if SOFTMAX:
            mx0 = max_nan(mx0, shfl_xor(FULL, mx0, 1))
            mx0 = max_nan(mx0, shfl_xor(FULL, mx0, 2))
            mx1 = max_nan(mx1, shfl_xor(FULL, mx1, 1))
            mx1 = max_nan(mx1, shfl_xor(FULL, mx1, 2))
            n0 = max_nan(m0, mx0)
            n1 = max_nan(m1, mx1)
            if not (n0 == NEG_INF):
                scale0 = ex2(m0 - n0)
            if not (n1 == NEG_INF):
                scale1 = ex2(m1 - n1)
            m0 = n0
            m1 = n1
            d0 *= scale0
            d1 *= scale1
            for e in range(SA):
                sc = s[e]
                p = float32(0.0)
                if not (sc == NEG_INF):
                    p = ex2(sc - (m1 if e & 2 else m0))
                s[e] = p
                if e & 2:
                    d1 += p
                else:
                    d0 += p
        else:
            for k in range(NB * 4):
                if s[k] == NEG_INF:
                    s[k] = float32(0.0)
        for db in range(DB):
            o[db * 4] *= scale0
            o[db * 4 + 1] *= scale0
            o[db * 4 + 2] *= scale1
            o[db * 4 + 3] *= scale1
        return m0, m1, d0, d1

    @cuda.jit(device=True, inline="always")
    def epilogue(skv, sm, sd, o, v8, lanes, work, geo, m0, m1, d0, d1, out_words, lse, partial_out, partial_lse,
                 params, row_qo_pos):  # fmt: skip
        """Row sums over the quad; O staged as fp32 rows (word r * HEAD_DIM + dim), then written by
        8-vectors like the CUDA-core kernel (sink, output hook, LSE, partial slots). Tuples as pass_rows."""
        tid, lane, wrow, g, t4 = lanes
        request, kv_head, n_tok, tok0, head0, kv_start, kv_stop, slot, slot_stride, qo_pos0, row0, kv_off = work
        q_stride_n, q_stride_h, page_stride, token_stride, head_stride, pdiv, write_lse, num_qo_heads, use_positions = geo
        d0 += shfl_xor(FULL, d0, 1)
        d0 += shfl_xor(FULL, d0, 2)
        d1 += shfl_xor(FULL, d1, 1)
        d1 += shfl_xor(FULL, d1, 2)
        if t4 == 0:
            sm[wrow + g] = m0
            sm[wrow + g + 8] = m1
            sd[wrow + g] = d0
            sd[wrow + g + 8] = d1
        for db in range(DB):
            for k in range(4):
                skv[(wrow + g + 8 * (k >> 1)) * HEAD_DIM + db * 8 + 2 * t4 + (k & 1)] = prim.f32_to_bits(o[db * 4 + k])
        cuda.syncthreads()
        for item in range(tid, R * CH, NT):
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
                        v8[k] = prim.bits_to_f32(skv[r * HEAD_DIM + dim0 + k])
                    lse_value = float32(0.0)
                else:
                    m_row = sm[r]
                    d = sd[r]
                    rescale = float32(1.0)
                    if HAS_SINK and slot < 0:
                        sink = float32(sink_hook(qo_head, params) * LOG2E)
                        if not (sink == NEG_INF):
                            m_new = max_nan(m_row, sink)
                            rescale = ex2(m_row - m_new)
                            d = d * rescale + ex2(sink - m_new)
                            m_row = m_new
                    if d > float32(0.0) or d != d:
                        inv = rescale / d
                        for k in range(8):
                            v8[k] = prim.bits_to_f32(skv[r * HEAD_DIM + dim0 + k]) * inv
                        lse_value = float32((m_row + math.log2(d)) * LN2)
                if slot < 0:
                    o_hook(v8, dim0, request, qo_head, token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok0 + tok), params)
                    out_row = (row0 + tok0 + tok) * num_qo_heads + qo_head
                    prim.store_row8(out_words, out_row * RW + chunk * WORDS8, KIND, v8)
                    if dim0 == 0 and write_lse != 0:
                        lse[out_row] = lse_value
                else:
                    part_row = (slot + (tok0 + tok) * slot_stride) * GROUP + head
                    for k in range(8):
                        partial_out[part_row * HEAD_DIM + dim0 + k] = v8[k]
                    if dim0 == 0:
                        partial_lse[part_row] = lse_value
        cuda.syncthreads()

    @cuda.jit(device=True, inline="always")
    def score_tile(skv, qa, s, o, km, kbase, flags, kb0, n_kv, refused, m0, m1, d0, d1, lanes, work, s_scale, params,
                   row_qo_pos, use_positions, live):  # fmt: skip
        """One S tile: KV tokens kb0 .. kb0 + n_kv (<= SB) whose K rows start at word ``kbase`` of a
        landed stage (V at V_BASE + kbase, refused flags at ``flags``): S = Q K^T, masks, online
        softmax, O += P V. Every thread of the CTA calls it (barriers). Returns (m0, m1, d0, d1)."""
        tid, lane, wrow, g, t4 = lanes
        request, kv_head, n_tok, tok0, head0, kv_start, kv_stop, slot, slot_stride, qo_pos0, row0, kv_off = work
        masked_any = 0
        if live:
            if Q_SHARED:
                scores_q_shared(skv, qa, s, kbase, lane, wrow)
            else:
                scores(skv, qa, s, kbase, lane)
            masked_any, mx0, mx1 = mask_scores(s, km, g, t4, wrow, s_scale, n_tok, tok0, head0, n_kv, kb0, request,
                                               kv_head, qo_pos0, row0, kv_off, params, row_qo_pos, use_positions)  # fmt: skip
            if PAGED and refused != 0:
                mx0, mx1 = refuse_scores(skv, s, km, flags, t4)
                masked_any = 1
            m0, m1, d0, d1 = softmax_block(s, o, m0, m1, d0, d1, mx0, mx1)
        # a masked entry next to a non-finite V element: the selected path (CTA-uniform); a refused
        # row's V is zero-filled, so refused rows alone never need it
        slow = 0
        if CAUSAL or HAS_MASK:
            masked_any = cuda.syncthreads_or(masked_any)
            if masked_any != 0:
                slow = cuda.syncthreads_or(has_non_finite(skv, V_BASE + kbase, tid))
        if slow != 0:
            pv_selected(skv, s, km, o, kbase, V_BASE + kbase, lane, wrow, g, t4, n_kv, live)
        elif live:
            pv_mma(skv, s, o, V_BASE + kbase, lane)
        return m0, m1, d0, d1

    @cuda.jit(device=True, inline="always")
    def pass_rows(skv, sm, sd, qa, s, o, km, v8, pair8, lanes, work, geo, s_scale, kv_indptr, kv_indices, header,
                  q_words, k_words, v_words, out_words, lse, partial_out, partial_lse, params, row_qo_pos):  # fmt: skip
        """One pass: R rows (tokens tok0 .. tok0 + n_tok of the tile x heads head0 .. head0 + HP)
        against KV [kv_start, kv_stop), every warp on its 16 rows, all sharing the KV stages.
        ``lanes`` = (tid, lane, wrow, g, t4); ``work`` = (request, kv_head, n_tok, tok0, head0, kv_start,
        kv_stop, slot, slot_stride, qo_pos0, row0, kv_off); ``geo`` = (q_stride_n, q_stride_h,
        page_stride, token_stride, head_stride, (page_size, page_div_magic, page_div_shift), write_lse,
        num_qo_heads, use_positions) (tuples: a device call takes at most 30 arguments)."""
        tid, lane, wrow, g, t4 = lanes
        request, kv_head, n_tok, tok0, head0, kv_start, kv_stop, slot, slot_stride, qo_pos0, row0, kv_off = work
        q_stride_n, q_stride_h, page_stride, token_stride, head_stride, pdiv, write_lse, num_qo_heads, use_positions = geo
        stage_q(skv, v8, pair8, tid, request, kv_head, n_tok, tok0, head0, row0, qo_pos0, q_words,
                q_stride_n, q_stride_h, params, row_qo_pos, use_positions)  # fmt: skip
        cuda.syncthreads()
        live = wrow < n_tok * HP  # warp-uniform: a warp past the pass's rows skips the math
        if live and not Q_SHARED:
            q_fragments(skv, qa, lane, wrow)
        cuda.syncthreads()  # the Q words are free (or, Q_SHARED, not in the stages): block 0 lands on them
        refused_now = 0  # this thread flagged a refused row in the block being computed / the next one
        refused_next = 0
        if kv_start < kv_stop:
            refused_next = load_block(skv, 0, kv_start, min(int64(KB), kv_stop - kv_start), request, kv_head, kv_indptr,
                                      kv_indices, header, k_words, v_words, page_stride, token_stride, head_stride,
                                      pdiv, params, kv_off, tid, v8, pair8)  # fmt: skip
        for k in range(OA):
            o[k] = float32(0.0)
        m0 = NEG_INF  # running max of rows g and g + 8 (log2 domain), lane-partial sums
        m1 = NEG_INF
        d0 = float32(0.0)
        d1 = float32(0.0)
        stage = 0
        for kb0 in range(kv_start, kv_stop, KB):
            n_kv = min(int64(KB), kv_stop - kb0)
            refused_now = refused_next
            if kb0 + KB < kv_stop:  # the next block flies while this one is computed
                refused_next = load_block(skv, 1 - stage, kb0 + KB, min(int64(KB), kv_stop - kb0 - KB), request,
                                          kv_head, kv_indptr, kv_indices, header, k_words, v_words, page_stride,
                                          token_stride, head_stride, pdiv, params, kv_off, tid, v8, pair8)  # fmt: skip
                wait_1()
            else:
                wait_0()
            refused = 0
            if PAGED:  # the block landed, and whether any of its rows had a refused page id
                refused = cuda.syncthreads_or(refused_now)
            else:
                cuda.syncthreads()
            for sub in range(SUBS):  # the stage's S tiles of SB tokens (CTA-uniform: n_kv is)
                n_sub = min(int64(SB), n_kv - sub * SB)
                if n_sub > 0:
                    m0, m1, d0, d1 = score_tile(skv, qa, s, o, km, stage * STAGE + sub * SB * RW,
                                                REFUSED_BASE + stage * KB + sub * SB, kb0 + sub * SB, n_sub, refused,
                                                m0, m1, d0, d1, lanes, work, s_scale, params, row_qo_pos, use_positions,
                                                live)  # fmt: skip
            cuda.syncthreads()  # every warp is done with this stage before it is refilled
            stage = 1 - stage
        epilogue(skv, sm, sd, o, v8, lanes, work, geo, m0, m1, d0, d1, out_words, lse, partial_out, partial_lse,
                 params, row_qo_pos)

    def prefill_mma_kernel(
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
        lane = tid & (WARP - 1)
        wrow = (tid >> 5) * 16  # this warp's first row of the pass
        g = lane >> 2
        t4 = lane & 3
        # K stages [0, 2 STAGE), V stages [2 STAGE, 4 STAGE); the Q tile and the fp32 O rows are
        # staged in the same words while no KV block is live
        # (dynamic shared memory: the launch passes cfg.dynamic_shared_bytes = 4 * SMEM_WORDS)
        if SIM:
            skv = cuda.shared.array(0, int32)
        else:
            skv = cuda.shared.array(0, int32, alignment=16)
        sm = cuda.shared.array(R, float32)
        sd = cuda.shared.array(R, float32)
        qa = cuda.local.array(QA, int32)
        s = cuda.local.array(SA, float32)
        o = cuda.local.array(OA, float32)
        km = cuda.local.array(SA, int32)  # 1: the score is kept (not masked / out of range)
        v8 = cuda.local.array(8, float32)
        pair8 = cuda.local.array(8, float32)
        # scores are scaled in fp32 after Q K^T: into the log2 domain, unless a hook needs natural units
        s_scale = float32(sm_scale) if NATURAL else float32(sm_scale * LOG2E)
        lanes = (int64(tid), int64(lane), int64(wrow), int64(g), int64(t4))
        geo = (int64(q_stride_n), int64(q_stride_h), int64(page_stride), int64(token_stride), int64(head_stride),
               (int64(page_size), int64(page_div_magic), int32(page_div_shift)), int64(write_lse), int64(num_qo_heads),
               int64(use_positions))  # fmt: skip
        num_tiles = header[H_NUM_TILES]
        cta = cuda.blockIdx.x
        tile_stop = min(cta_tile_indptr[cta + 1], num_tiles)
        for tile in range(cta_tile_indptr[cta], tile_stop):
            request = int64(tile_request[tile])
            kv_head = int64(tile_kv_head[tile])
            q_start = int64(tile_q_start[tile])
            n_tok_tile = int64(tile_q_end[tile]) - q_start
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
            # passes of TP tokens x HP heads = R rows (the plan's tile may hold more tokens than one pass)
            for tok0 in range(0, n_tok_tile, TP):
                n_tok = min(int64(TP), n_tok_tile - tok0)
                kv_stop = kv_end
                if CAUSAL:  # blocks past the pass's last visible position are skipped
                    last = token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok0)
                    for tok in range(tok0 + 1, tok0 + n_tok):
                        last = max(last, token_pos(use_positions, row_qo_pos, row0, qo_pos0, tok))
                    kv_stop = max(kv_start, min(kv_end, last - kv_off + 1))
                for head0 in range(0, GROUP, HP):
                    work = (request, kv_head, n_tok, tok0, head0, kv_start, kv_stop, slot, slot_stride, qo_pos0, row0, kv_off)
                    pass_rows(skv, sm, sd, qa, s, o, km, v8, pair8, lanes, work, geo, s_scale, kv_indptr, kv_indices, header,
                              q_words, k_words, v_words, out_words, lse, partial_out, partial_lse, params, row_qo_pos)  # fmt: skip

    return PREFILL_ARGS.check(prefill_mma_kernel)


@lru_cache(maxsize=None)
def prefill_mma_kernel(cfg: PrefillMmaConfig) -> Any:
    """The launchable kernel for ``cfg``: compiled once per process (on first launch)."""
    return cuda.jit(make_prefill_mma_kernel(cfg), fastmath=fastmath_flags())


def gpu_compile_specs() -> list[CompileSpec]:
    """The benchmark shape (bf16 hd128 g4 paged causal), fp16 hd64 ragged full, a hooked variant, RoPE
    and head_dim 256; then the decode engine's shapes (family decode_mma)."""
    from .compile_spec import PREFILL_CHECK_HOOKS as CHECK_HOOKS
    from .compile_spec import CompileSpec, PerfHints, prefill_variant_cases

    rope = next(hooks for *_, hooks in prefill_variant_cases() if hooks.query_pair_transform is not None)
    cases = [
        (prim.BF16, 128, 4, True, True, DEFAULT_HOOKS, False),
        (prim.BF16, 128, 4, True, True, DEFAULT_HOOKS, True),  # the 16-row shape of short-query plans
        (prim.F16, 64, 1, False, False, DEFAULT_HOOKS, False),
        (prim.F16, 64, 8, True, True, CHECK_HOOKS, False),
        (prim.BF16, 64, 4, True, True, rope, False),  # q and k transformed (k loaded by the threads)
        (prim.BF16, 256, 2, True, True, DEFAULT_HOOKS, False),  # head_dim 256 (Gemma): the Q tile in shared memory
    ]
    specs = []
    for kind, head_dim, group, paged, causal, hooks, short in cases:
        shape = prefill_mma_short_shape(head_dim) if short else prefill_mma_shape(head_dim)
        cfg = PrefillMmaConfig(kind, head_dim, group, paged, causal, hooks, warps=shape.warps, kv_tokens=shape.kv_tokens)
        ab = "f16" if kind == prim.F16 else "bf16"
        label = hooks.name.split("#")[0]
        specs.append(
            CompileSpec(
                name=f"prefill_mma[{DTYPE_NAMES[kind]},hd{head_dim},g{group},{'paged' if paged else 'ragged'},{'causal' if causal else 'full'},{label}{',rows16' if short else ''}]",
                pyfunc=make_prefill_mma_kernel(cfg),
                signature=PREFILL_ARGS.signature,
                expect=(f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32", "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "cp.async.cg.shared.global", MAX_NAN_PTX),  # fmt: skip
                fastmath=fastmath_flags(),
                perf=PerfHints(threads=cfg.threads, ctas_per_sm=2, bound="compute", issue_trips=cfg.issue_trips,
                               dynamic_shared_bytes=cfg.dynamic_shared_bytes,
                               score_tiles=cfg.kv_block // cfg.score_block),  # fmt: skip
            )
        )
    # BatchDecode's tensor-core engine (runtime.decode): one-token plans on the 16-row shape, not
    # causal, GQA group >= 5 (the tuning table's choice); HBM-bound like decode. The benchmark head_dim
    # first, then the smallest and largest the engine runs at its groups
    for kind, head_dim, group in ((prim.BF16, 128, 8), (prim.F16, 64, 8), (prim.BF16, 256, 16)):
        cfg = tensor_core_config(kind, head_dim, group, True, False, short=True)
        ab = "f16" if kind == prim.F16 else "bf16"
        specs.append(
            CompileSpec(
                name=f"decode_mma[{DTYPE_NAMES[kind]},hd{head_dim},g{group},default]",
                pyfunc=make_prefill_mma_kernel(cfg),
                signature=PREFILL_ARGS.signature,
                expect=(f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32", "cp.async.cg.shared.global", MAX_NAN_PTX),
                fastmath=fastmath_flags(),
                perf=PerfHints(threads=cfg.threads, ctas_per_sm=decode_tensor_ctas_per_sm(cfg.threads, cfg.shared_bytes),
                               family="decode_mma", issue_trips=cfg.issue_trips,
                               dynamic_shared_bytes=cfg.dynamic_shared_bytes,
                               score_tiles=cfg.kv_block // cfg.score_block),  # fmt: skip
            )
        )
    return specs


def tensor_core_config(kind: int, head_dim: int, group: int, paged: bool, causal: bool,
                       hooks: AttentionHooks = DEFAULT_HOOKS, short: bool = False) -> PrefillMmaConfig | None:  # fmt: skip
    """The tensor-core specialization BatchPrefill launches, or None for the CUDA-core kernel (fp32,
    head_dim % 16 != 0). Every variant runs on it; one that transforms q or k (RoPE, a key hook) has
    the transformed values computed in fp32 and rounded to the input dtype for the mma, as the
    tensor-core kernels of other engines do (the CUDA-core kernel keeps them fp32); k is then loaded,
    transformed and stored by the threads, not by cp.async. ``short``: the 16-row shape for plans of
    short queries only (kernels.tuning.prefill_mma_short_shape)."""
    if kind not in (prim.F16, prim.BF16) or head_dim % 16:
        return None
    shape = prefill_mma_short_shape(head_dim) if short else prefill_mma_shape(head_dim)
    return PrefillMmaConfig(kind, head_dim, group, paged, causal, hooks, warps=shape.warps, kv_tokens=shape.kv_tokens)
