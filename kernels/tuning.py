"""Every launch-shape choice that differs between the simulator and a GPU, in one table.

On a GPU the shapes aim at full warps and ~128 threads per CTA; on the simulator every CUDA thread
is a Python thread and every block runs after the previous one, so blocks and grids stay tiny
there. The shapes are functions of the kernel's compile-time axes only (never of a batch), so a
captured CUDA graph's launches keep their shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from tilegraph._device import SIMULATOR

GPU_THREADS = 128  # target threads per CTA on a GPU

#: fixed grid of the partial-merge kernel after a split decode/prefill (it loops over live merges)
PARTIAL_MERGE_CTAS = 4


def lanes_per_row(head_dim: int) -> int:
    """Lanes splitting one head_dim row into 8-element vectors, rounded up to a power of two."""
    lanes = head_dim // 8
    return 1 << (lanes - 1).bit_length()


def decode_rows(head_dim: int) -> int:
    """Token rows (blockDim.y) of the decode kernel: 128 threads on a GPU, 2 rows on the simulator."""
    return 2 if SIMULATOR else max(1, GPU_THREADS // lanes_per_row(head_dim))


def prefill_threads() -> int:
    """Threads per prefill CTA: 128 on a GPU, 32 on the simulator."""
    return 32 if SIMULATOR else GPU_THREADS


def prefill_kv_block(head_dim: int) -> int:
    """KV tokens per prefill shared-memory block (q, k, v and score tiles under 48 KB of static
    shared memory on a GPU); 8 on the simulator."""
    if SIMULATOR:
        return 8
    return 16 if head_dim <= 128 else 8


@dataclass(frozen=True)
class PrefillMmaShape:
    """Launch shape of the tensor-core prefill (kernels.prefill_mma): ``warps`` x 16 query rows per
    pass (all warps share the KV stages), ``kv_tokens`` KV tokens per stage (2 stages of K and V)."""

    warps: int
    kv_tokens: int

    @property
    def rows(self) -> int:
        return 16 * self.warps


#: static shared memory a CTA may take without cuFuncSetAttribute (numba-cuda issue #94)
STATIC_SHARED_BYTES = 48 * 1024


def prefill_mma_shape(head_dim: int, simulator: bool = SIMULATOR) -> PrefillMmaShape:
    """GPU: 128-row query tiles (8 warps) over 64-token KV stages up to head_dim 64; 64-row tiles
    (4 warps) over 32-token stages up to 128; 32 rows over 16 tokens beyond. Two fp16/bf16 stages of
    K and V take 4 x tokens x head_dim x 2 bytes of static shared memory (<= 48 KB: 64 tokens at
    head_dim 128 would need 64 KB of dynamic shared memory, which numba-cuda cannot opt into); the
    Q tile and the fp32 O rows are staged in the same words, so rows <= 2 x tokens. Simulator
    (``simulator``): one warp (16 rows) over 16-token stages."""
    if simulator:
        return PrefillMmaShape(1, 16)
    if head_dim <= 64:
        return PrefillMmaShape(8, 64)
    if head_dim <= 128:
        return PrefillMmaShape(4, 32)
    return PrefillMmaShape(2, 16)


def prefill_mma_short_shape(head_dim: int, simulator: bool = SIMULATOR) -> PrefillMmaShape:
    """The 16-row (one-warp) shape BatchPrefill launches for a plan of short queries only
    (``PrefillPlan.tile_rows`` 16): the full shape's KV stages with one warp. Simulator: the same
    one-warp shape as ``prefill_mma_shape``."""
    return PrefillMmaShape(1, prefill_mma_shape(head_dim, simulator).kv_tokens)


def prefill_mma_kv_block(head_dim: int) -> int:
    """KV tokens per stage of the tensor-core prefill (``prefill_mma_shape(head_dim).kv_tokens``)."""
    return prefill_mma_shape(head_dim).kv_tokens


#: query rows (tokens x GQA heads) of a CUDA-core prefill tile and of a short-query plan
SMALL_TILE_ROWS = 16


def prefill_tile_rows(kind: int, head_dim: int, simulator: bool = SIMULATOR) -> int:
    """Query rows of the planner's prefill tiles: the tensor-core kernel's rows per pass for fp16 /
    bf16 with head_dim % 16 == 0 (kind codes 0 / 1), else the CUDA-core kernel's 16."""
    if kind in (0, 1) and head_dim % 16 == 0:
        return prefill_mma_shape(head_dim, simulator).rows
    return SMALL_TILE_ROWS


def append_threads() -> int:
    """Target threads per append_kv CTA: 128 on a GPU, 16 on the simulator."""
    return 16 if SIMULATOR else GPU_THREADS


MERGE_MAX_LANES = 32  # lanes per merged row (head_dim / 8 beyond this: each lane handles several vectors)


def merge_block(head_dim: int) -> tuple[int, int]:
    """(lanes per row, rows per block) of the merge kernels: 128 threads on a GPU, 2 rows on the simulator."""
    lanes = min(head_dim // 8, MERGE_MAX_LANES)
    rows = 2 if SIMULATOR else max(1, GPU_THREADS // lanes)
    return lanes, rows


def merge_max_grid() -> int:
    """Blocks of the pair/states merge kernels (rows beyond: a persistent loop): 4096 on a GPU, 2 simulated."""
    return 2 if SIMULATOR else 4096


@dataclass(frozen=True)
class DecodePipelineShape:
    """Launch shape of the pipelined decode kernel (kernels.decode_pipeline): block (lanes, heads,
    rows); a stage holds rows * tokens_per_row tokens of K and of V; ``stages`` buffers of each."""

    lanes: int
    heads: int
    rows: int
    tokens_per_row: int
    stages: int


#: query heads of a GQA group per pass of the pipelined decode (larger groups: several passes)
PIPELINE_MAX_HEADS = 8
#: target tokens per stage on a GPU, and the shared-memory bytes the K/V stage buffers may take
PIPELINE_STAGE_TOKENS = 16
PIPELINE_TILE_BYTES = 32 * 1024


def decode_pipeline_shape(kind: int, head_dim: int, group: int) -> DecodePipelineShape:
    """GPU: ~128 threads, (head_dim/8 lanes) x (the group's heads, <= 8 per pass) x rows, 2 stages of
    up to 16 tokens within 32 KB of K/V buffers. Simulator: 2 heads x 2 rows x 2 tokens per row."""
    lanes = lanes_per_row(head_dim)
    if SIMULATOR:
        return DecodePipelineShape(lanes, min(group, 2), 2, 2, 2)
    heads = min(group, PIPELINE_MAX_HEADS)
    rows = max(1, GPU_THREADS // (lanes * heads))
    row_bytes = head_dim * (4 if kind == 2 else 2)  # primitives.F32 == 2
    stages = 2
    tokens = max(rows, min(PIPELINE_STAGE_TOKENS, PIPELINE_TILE_BYTES // (2 * stages * row_bytes)))
    return DecodePipelineShape(lanes, heads, rows, max(1, tokens // rows), stages)
