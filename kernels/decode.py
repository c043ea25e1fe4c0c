"""The CUDA-core split-KV paged decode kernel: superseded by ``kernels/decode_pipeline.py`` (what
``BatchDecode`` launches), kept as the static performance model's documented baseline
(docs/perf-model.md) and as the home of the partial-merge specs of decode variants.

Persistent CTAs walk their tile lists from the plan buffer.

Thread block (BDX, BDY): BDX lanes (a power of two <= 32) split head_dim into 8-element vectors
(one 16-byte load each for fp16/bf16, two for fp32); the BDY rows walk a tile's tokens in an
interleaved stride, each keeping its own online-softmax state for up to MAX_HEADS_PER_PASS query
heads of the GQA group, so every K/V element is loaded once per pass for all of them (groups of
up to 4 heads: once in all; larger groups take ceil(group / 4) passes, keeping per-thread state in
registers). Rows are combined through shared
memory at the end of a tile. Scores live in the log2 domain (``ex2``); every LSE written is a
natural log.

A tile (request, kv_head, [start, end)) with slot -1 writes the final output rows (and LSE); a
split tile writes fp32 partials (normalized output, natural LSE) into its slot, combined later by
the partial-merge kernel. An empty tile (kv_len 0) writes zeros and -inf.

Compile-time specialization: dtype code, head_dim, group size, block shape and the variant hooks
(DecodeHooks: transforms, logits transform/mask, rotate-half pair transforms whose partner half is
re-loaded from global memory, a sink joined once -- here for unsplit tiles, in the partial merge
for split ones -- and softmax on/off). Everything else (plan, page table, strides, scale, the
variant's float32 ``params``) is read at run time from fixed buffers/scalars.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from numba import float32, int64

from tilegraph._device import SIMULATOR, cuda
from tilegraph.planner.layout import H_NUM_TILES

from . import primitives as prim
from .args import ATTENTION_KV_OUT_ARGS, I32, KernelArgs
from .hooks import DEFAULT_HOOKS, LOG2E, LN2, NEG_INF, DTYPE_NAMES, AttentionHooks
from .hooks import identity_logit as _identity_logit
from .hooks import identity_pair as _identity_pair
from .hooks import identity_vec as _identity_vec
from .hooks import no_mask as _no_mask
from .hooks import no_sink as _no_sink
from .nan import fastmath_flags, nan_expect, nan_max
from .tuning import decode_rows, lanes_per_row

if TYPE_CHECKING:
    from .compile_spec import CompileSpec

#: query heads of a GQA group handled per pass over a tile's K/V (per-thread state: 8 fp32 each)
MAX_HEADS_PER_PASS = 4
DecodeHooks = AttentionHooks  # the hook set's former name (kept: examples and users import it)

DECODE_ARGS = KernelArgs("decode", (
    ("header", I32), ("cta_tile_indptr", I32), ("tile_request", I32), ("tile_kv_head", I32),
    ("tile_token_start", I32), ("tile_token_end", I32), ("tile_slot", I32),
    ("kv_indptr", I32), ("kv_indices", I32), ("kv_len", I32),
    ("q_words", I32), ("q_stride_b", "int64"), ("q_stride_h", "int64"),
    *ATTENTION_KV_OUT_ARGS,
))  # fmt: skip


@dataclass(frozen=True)
class DecodeConfig:
    """One compiled specialization of the decode kernel."""

    kind: int  # primitives.F16 / BF16 / F32
    head_dim: int
    group: int
    bdy: int
    hooks: AttentionHooks = DEFAULT_HOOKS

    @property
    def bdx(self) -> int:
        return lanes_per_row(self.head_dim)

    @property
    def block(self) -> tuple[int, int]:
        return (self.bdx, self.bdy)


def default_bdy(head_dim: int) -> int:
    """Token rows per CTA (kernels.tuning.decode_rows)."""
    return decode_rows(head_dim)


def make_decode_kernel(cfg: DecodeConfig) -> Callable[..., Any]:
    """The plain Python kernel function for ``cfg`` (cuda.jit it to launch, compile_ptx to check)."""
    KIND, HEAD_DIM, GROUP, BDX, BDY = cfg.kind, cfg.head_dim, cfg.group, cfg.bdx, cfg.bdy
    LANES = HEAD_DIM // 8
    WORDS8 = prim.words_per_row8(KIND)
    ROW_WORDS = LANES * WORDS8  # words per head_dim row of the value dtype
    PASS = min(GROUP, MAX_HEADS_PER_PASS)
    PASS8 = PASS * 8
    hooks = cfg.hooks
    HAS_LOGITS_HOOK = hooks.logits_transform is not None
    HAS_MASK = hooks.logits_mask is not None
    HAS_Q_PAIR = hooks.query_pair_transform is not None
    HAS_K_PAIR = hooks.key_pair_transform is not None
    HAS_SINK = hooks.sink is not None
    SOFTMAX = hooks.softmax
    NATURAL = HAS_LOGITS_HOOK or not SOFTMAX  # scores in natural units (else log2 units)
    HALF_LANES = LANES // 2
    # in the closure, so numba's disk cache key follows the variant and tilegraph's kernel sources
    CACHE_KEY = int(hashlib.sha256(f"{hooks.name}|{_kernel_sources_digest()}".encode()).hexdigest()[:15], 16)
    q_hook = hooks.query_transform or _identity_vec
    k_hook = hooks.key_transform or _identity_vec
    o_hook = hooks.output_transform or _identity_vec
    logit_hook = hooks.logits_transform or _identity_logit
    mask_hook = hooks.logits_mask or _no_mask
    q_pair_hook = hooks.query_pair_transform or _identity_pair
    k_pair_hook = hooks.key_pair_transform or _identity_pair
    sink_hook = hooks.sink or _no_sink
    load_row8, store_row8, ex2, warp_sum = prim.load_row8, prim.store_row8, prim.ex2, prim.warp_sum

    def decode_kernel(
        header, cta_tile_indptr, tile_request, tile_kv_head, tile_token_start, tile_token_end, tile_slot,
        kv_indptr, kv_indices, kv_len,
        q_words, q_stride_b, q_stride_h,
        k_words, v_words, page_stride, token_stride, head_stride, page_size,
        out_words, lse, write_lse, partial_out, partial_lse,
        sm_scale, num_qo_heads, params,
    ):  # fmt: skip
        if CACHE_KEY < 0:  # never true; keeps CACHE_KEY in the closure
            return
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        active = tx < LANES
        dim0 = tx * 8
        # shared: the BDY token rows' states of one head, combined at the end of a tile
        sh_acc = cuda.shared.array((BDY, HEAD_DIM), float32)
        sh_m = cuda.shared.array(BDY, float32)
        sh_d = cuda.shared.array(BDY, float32)
        q_loc = cuda.local.array(PASS8, float32)
        acc = cuda.local.array(PASS8, float32)
        m = cuda.local.array(PASS, float32)
        d = cuda.local.array(PASS, float32)
        weight = cuda.local.array(PASS, float32)
        taken = cuda.local.array(PASS, float32)
        kv8 = cuda.local.array(8, float32)
        pair8 = cuda.local.array(8, float32)
        partner = tx + HALF_LANES if tx < HALF_LANES else tx - HALF_LANES  # lane of the rotate-half partner
        # q pre-scaled into the log2 domain, unless a logits hook (or no softmax) needs the natural score
        q_scale = float32(sm_scale) if NATURAL else float32(sm_scale * LOG2E)
        num_tiles = header[H_NUM_TILES]
        cta = cuda.blockIdx.x
        tile_stop = min(cta_tile_indptr[cta + 1], num_tiles)
        for tile in range(cta_tile_indptr[cta], tile_stop):
            request = int64(tile_request[tile])
            kv_head = int64(tile_kv_head[tile])
            t_begin = tile_token_start[tile]
            t_end = tile_token_end[tile]
            slot = int64(tile_slot[tile])
            qo_pos = kv_len[request] - 1
            page_base = int64(kv_indptr[request])
            # the GQA group in passes of PASS heads (one pass for groups <= 4): per-thread state stays small
            for head0 in range(0, GROUP, PASS):
                for j in range(PASS):
                    qo_head = kv_head * GROUP + head0 + j
                    for k in range(8):
                        kv8[k] = float32(0.0)
                    if active and head0 + j < GROUP:
                        q_row = request * q_stride_b + qo_head * q_stride_h
                        load_row8(q_words, q_row + tx * WORDS8, KIND, kv8)
                        if HAS_Q_PAIR:
                            load_row8(q_words, q_row + partner * WORDS8, KIND, pair8)
                            q_pair_hook(kv8, pair8, dim0, HEAD_DIM, request, qo_head, qo_pos, params)
                        q_hook(kv8, dim0, request, qo_head, qo_pos, params)
                    for k in range(8):
                        q_loc[j * 8 + k] = kv8[k] * q_scale
                        acc[j * 8 + k] = float32(0.0)
                    m[j] = NEG_INF
                    d[j] = float32(0.0)
                # every row runs the same number of steps: warp collectives need all lanes present
                for t0 in range(t_begin, t_end, BDY):
                    t = t0 + ty
                    valid = t < t_end
                    row = int64(0)
                    for k in range(8):
                        kv8[k] = float32(0.0)
                    if valid:
                        page = int64(kv_indices[page_base + t // page_size])
                        row = page * page_stride + int64(t % page_size) * token_stride + kv_head * head_stride
                        if active:
                            load_row8(k_words, row + tx * WORDS8, KIND, kv8)
                            if HAS_K_PAIR:
                                load_row8(k_words, row + partner * WORDS8, KIND, pair8)
                                k_pair_hook(kv8, pair8, dim0, HEAD_DIM, request, kv_head, t, params)
                            k_hook(kv8, dim0, request, kv_head, t, params)
                    for j in range(PASS):
                        qo_head = kv_head * GROUP + head0 + j
                        part = float32(0.0)
                        for k in range(8):
                            part += q_loc[j * 8 + k] * kv8[k]
                        s = warp_sum(part, BDX)
                        if HAS_LOGITS_HOOK:
                            s = float32(logit_hook(s, request, qo_pos, t, qo_head, kv_head, params))
                            if SOFTMAX:
                                s = float32(s * LOG2E)
                        if HAS_MASK:
                            if not mask_hook(request, qo_pos, t, qo_head, kv_head, params):
                                s = NEG_INF
                        weight[j] = float32(0.0)
                        # a position joins when in range and not masked; a NaN score joins too (so
                        # it shows); masked / out-of-range ones are selected out, never weighted by 0
                        take = valid and not (s == NEG_INF)
                        taken[j] = float32(1.0) if take else float32(0.0)
                        if not SOFTMAX:
                            if take:
                                weight[j] = s  # softmax-free: the (transformed) score is the weight
                        elif take:
                            m_new = nan_max(m[j], s)
                            rescale = ex2(m[j] - m_new)
                            weight[j] = ex2(s - m_new)
                            d[j] = d[j] * rescale + weight[j]
                            m[j] = m_new
                            for k in range(8):
                                acc[j * 8 + k] *= rescale
                    if valid and active:
                        load_row8(v_words, row + tx * WORDS8, KIND, kv8)
                        for j in range(PASS):
                            if taken[j] != float32(0.0):
                                for k in range(8):
                                    acc[j * 8 + k] += weight[j] * kv8[k]
                for j in range(PASS):
                    qo_head = kv_head * GROUP + head0 + j
                    if active:
                        for k in range(8):
                            sh_acc[ty, dim0 + k] = acc[j * 8 + k]
                    if tx == 0:
                        sh_m[ty] = m[j]
                        sh_d[ty] = d[j]
                    cuda.syncthreads()
                    if ty == 0 and active and head0 + j < GROUP:
                        for k in range(8):
                            kv8[k] = float32(0.0)
                        lse_value = NEG_INF
                        if SOFTMAX:
                            m_all = NEG_INF
                            for r in range(BDY):
                                m_all = nan_max(m_all, sh_m[r])
                            d_all = float32(0.0)
                            if not (m_all == NEG_INF):  # NaN included: it must show
                                for r in range(BDY):
                                    w = ex2(sh_m[r] - m_all)
                                    d_all += sh_d[r] * w
                                    for k in range(8):
                                        kv8[k] += sh_acc[r, dim0 + k] * w
                            if HAS_SINK and slot < 0:
                                # the sink: a state (zeros, LSE = sink) joined once; split requests: in the merge
                                sink = float32(sink_hook(qo_head, params) * LOG2E)
                                if not (sink == NEG_INF):
                                    m_new = nan_max(m_all, sink)
                                    rescale = ex2(m_all - m_new)
                                    d_all = d_all * rescale + ex2(sink - m_new)
                                    for k in range(8):
                                        kv8[k] *= rescale
                                    m_all = m_new
                            if d_all > float32(0.0) or d_all != d_all:
                                inv = float32(1.0) / d_all
                                for k in range(8):
                                    kv8[k] *= inv
                                lse_value = float32((m_all + math.log2(d_all)) * LN2)
                        else:
                            for r in range(BDY):
                                for k in range(8):
                                    kv8[k] += sh_acc[r, dim0 + k]
                            lse_value = float32(0.0)
                        if slot < 0:
                            o_hook(kv8, dim0, request, qo_head, qo_pos, params)
                            out_row = request * num_qo_heads + qo_head
                            store_row8(out_words, out_row * ROW_WORDS + tx * WORDS8, KIND, kv8)
                            if tx == 0 and write_lse != 0:
                                lse[out_row] = lse_value
                        else:
                            part_row = slot * GROUP + head0 + j
                            for k in range(8):
                                partial_out[part_row * HEAD_DIM + dim0 + k] = kv8[k]
                            if tx == 0:
                                partial_lse[part_row] = lse_value
                    cuda.syncthreads()

    return DECODE_ARGS.check(decode_kernel)


@lru_cache(maxsize=128)
def decode_kernel(cfg: DecodeConfig) -> Any:
    """The launchable kernel for ``cfg``: compiled once per process (on first launch). On a GPU,
    ``TILEGRAPH_KERNEL_CACHE=1`` also asks numba to cache it on disk (``cache=True``; numba keys it
    on the kernel's bytecode and closure, which holds a hash of the variant key and of tilegraph's
    kernel sources -- see CACHE_KEY in make_decode_kernel)."""
    disk = not SIMULATOR and os.environ.get("TILEGRAPH_KERNEL_CACHE") == "1"
    return cuda.jit(make_decode_kernel(cfg), fastmath=fastmath_flags(), cache=disk)


@lru_cache(maxsize=1)
def _kernel_sources_digest() -> str:
    """sha256 of tilegraph's kernel sources (numba's disk cache does not track helper modules)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def decode_signature(q_ndim: int = 1) -> str:
    """The numba signature of the decode kernel (from DECODE_ARGS)."""
    return DECODE_ARGS.signature


def gpu_compile_specs() -> list[CompileSpec]:
    """The partial-merge kernel of every decode variant that needs one (every dtype, every built-in
    variant at least once), and this superseded kernel at the benchmark shape (bf16, hd128, group 4)
    as the perf model's baseline (family ``decode_baseline``: no budgets)."""
    from .compile_spec import DECODE_CHECK_HOOKS as CHECK_HOOKS
    from .compile_spec import CompileSpec, PerfHints
    from .compile_spec import decode_variant_cases as builtin_variant_cases
    from .merge import PARTIAL_MERGE_SIGNATURE, make_partial_merge_kernel
    from .tuning import GPU_THREADS, PARTIAL_MERGE_CTAS

    cases = [
        (prim.BF16, 128, 4, DEFAULT_HOOKS),  # the benchmark shape (Hq 32 / Hkv 8)
        (prim.F16, 128, 1, DEFAULT_HOOKS),
        (prim.BF16, 64, 4, DEFAULT_HOOKS),
        (prim.F32, 256, 2, DEFAULT_HOOKS),
        (prim.F16, 96, 6, DEFAULT_HOOKS),
        (prim.BF16, 128, 4, CHECK_HOOKS),
        *builtin_variant_cases(),
    ]
    specs = []
    for index, (kind, head_dim, group, hooks) in enumerate(cases):
        if hooks.sink is not None or hooks.output_transform is not None or not hooks.softmax:
            specs.append(
                CompileSpec(
                    name=f"decode_merge[{DTYPE_NAMES[kind]},{hooks.name.split('#')[0]}]",
                    pyfunc=make_partial_merge_kernel(kind, hooks),
                    signature=PARTIAL_MERGE_SIGNATURE,
                    expect=("ld.global.nc.v4.u32", *nan_expect(hooks)),
                    fastmath=fastmath_flags(),
                    perf=PerfHints(threads=GPU_THREADS, grid_ctas=PARTIAL_MERGE_CTAS),
                )
            )
        if index:  # BatchDecode launches decode_pipeline: of this kernel only the baseline shape is checked
            continue
        bdy = max(1, 128 // DecodeConfig(kind, head_dim, group, 1).bdx)
        cfg = DecodeConfig(kind, head_dim, group, bdy, hooks)
        dtype = DTYPE_NAMES[kind]
        specs.append(
            CompileSpec(
                name=f"decode[{dtype},hd{head_dim},g{group},{hooks.name.split('#')[0]}]",
                pyfunc=make_decode_kernel(cfg),
                signature=decode_signature(),
                expect=("ld.global.nc.v4.u32", "shfl.sync.bfly", "ex2.approx", *nan_expect(hooks)),
                fastmath=fastmath_flags(),
                # lanes past head_dim / 8 load nothing; num_ctas = 2 x SMs
                perf=PerfHints(threads=cfg.bdx * bdy, hbm_fraction=(head_dim // 8) / cfg.bdx, ctas_per_sm=2,
                               family="decode_baseline"),
            )
        )
    return specs
