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


def prefill_mma_kv_block(head_dim: int) -> int:
    """KV tokens per stage of the tensor-core prefill (kernels.prefill_mma; a multiple of 16): two
    fp16/bf16 K and V stages plus the Q tile under 48 KB of static shared memory on a GPU (64 up to
    head_dim 64, 32 up to 128, else 16); 16 on the simulator (one P V k-step)."""
    if SIMULATOR:
        return 16
    return 64 if head_dim <= 64 else 32 if head_dim <= 128 else 16


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
