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

#: fixed grid of the partial-merge kernel after a split decode/prefill (it loops over live merges):
#: 264 on a GPU (2 per SM of an H100/H200; a 4-CTA grid ran the skewed batch's merge on 4 SMs at a
#: predicted 23 GB/s, ~36 us next to a ~60-85 us decode once decode reaches the HBM roof), 4 simulated
PARTIAL_MERGE_CTAS = 4 if SIMULATOR else 264


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
    pass (all warps share the KV stages), ``kv_tokens`` KV tokens per stage (2 stages of K and V),
    computed as S tiles of ``score_tokens`` tokens each (0: ``prefill_mma_score_tokens``)."""

    warps: int
    kv_tokens: int
    score_tokens: int = 0

    def __post_init__(self) -> None:
        if self.score_tokens == 0:
            object.__setattr__(self, "score_tokens", prefill_mma_score_tokens(self.kv_tokens, 0))

    @property
    def rows(self) -> int:
        return 16 * self.warps


#: static shared memory a CTA may take; more is dynamic shared memory the launch opts into
#: (cuFuncSetAttribute MAX_DYNAMIC_SHARED_SIZE_BYTES: kernels.launch.opt_in_shared_memory)
STATIC_SHARED_BYTES = 48 * 1024
#: fp32 S accumulators x head_dim one warp's S tile may hold: S (score_tokens / 2 per lane) next to
#: O (head_dim / 2 per lane) and the Q fragments stays under the 255-register file at head_dim 128
SCORE_TILE_ELEMENTS = 32 * 128


def prefill_mma_score_tokens(kv_tokens: int, head_dim: int) -> int:
    """KV tokens of one S = Q K^T tile: the largest multiple of 16 that divides ``kv_tokens`` with
    tokens x head_dim <= SCORE_TILE_ELEMENTS (16 at least; head_dim 0: ``kv_tokens``). head_dim 64:
    64, 128: 32, 256: 16. A 64-token stage at head_dim 128 is computed as two 32-token S tiles, so
    the stage's copies double without adding S registers."""
    if head_dim <= 0:
        return kv_tokens
    best = 16
    for tokens in range(16, kv_tokens + 1, 16):
        if kv_tokens % tokens == 0 and tokens * head_dim <= SCORE_TILE_ELEMENTS:
            best = tokens
    return min(best, kv_tokens)


def prefill_mma_shape(head_dim: int, simulator: bool = SIMULATOR) -> PrefillMmaShape:
    """GPU: 128-row query tiles (8 warps) over 64-token KV stages up to head_dim 64; 64-row tiles
    (4 warps) over 64-token stages (two 32-token S tiles each) up to 128; 32 rows over 16 tokens
    beyond. Two fp16/bf16 stages of K and V take 4 x tokens x head_dim x 2 bytes of shared memory:
    64 KB at head_dim 128, dynamic shared memory past the 48 KB static limit (the launch opts in);
    the Q tile and the fp32 O rows are staged in the same words, so rows <= 2 x tokens. Simulator
    (``simulator``): one warp (16 rows) over 16-token stages."""
    if simulator:
        return PrefillMmaShape(1, 16, 16)
    if head_dim <= 64:
        return PrefillMmaShape(8, 64, prefill_mma_score_tokens(64, head_dim))
    if head_dim <= 128:
        return PrefillMmaShape(4, 64, prefill_mma_score_tokens(64, head_dim))
    return PrefillMmaShape(2, 16, 16)


def prefill_mma_short_shape(head_dim: int, simulator: bool = SIMULATOR) -> PrefillMmaShape:
    """The 16-row (one-warp) shape BatchPrefill launches for a plan of short queries only
    (``PrefillPlan.tile_rows`` 16), and BatchDecode's tensor-core engine: one warp over stages of
    one S tile of the full shape (32 tokens at head_dim 128: 32 KB of K/V stages, so 6 one-warp CTAs
    fit an SM by shared memory). Simulator: the one-warp shape of ``prefill_mma_shape``."""
    score = prefill_mma_shape(head_dim, simulator).score_tokens
    return PrefillMmaShape(1, score, score)


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
    rows), where each of the ``heads`` y rows of threads holds ``heads_per_thread`` query heads of the
    GQA group (a pass covers heads * heads_per_thread heads); a stage holds rows * tokens_per_row
    tokens of K and of V; ``stages`` buffers of each."""

    lanes: int
    heads: int
    rows: int
    tokens_per_row: int
    stages: int
    heads_per_thread: int = 1

    @property
    def heads_per_pass(self) -> int:
        return self.heads * self.heads_per_thread


#: query heads of a GQA group per pass of the pipelined decode (larger groups: several passes)
PIPELINE_MAX_HEADS = 8
#: query heads one thread holds (its q and accumulator rows): each K/V vector it unpacks from shared
#: memory serves that many heads, so the unpack cost per byte falls with it; 4 keeps the bf16 hd128
#: g4 kernel within 128 registers (4 x 8 q + 4 x 8 accumulators)
PIPELINE_HEADS_PER_THREAD = 4
#: target tokens per stage on a GPU, and the shared-memory bytes the K/V stage buffers may take
PIPELINE_STAGE_TOKENS = 32
PIPELINE_TILE_BYTES = 32 * 1024
#: scores (heads x tokens) one row group of threads reduces per stage
PIPELINE_MAX_SCORES = 16


def split_heads(heads: int, per_thread: int) -> tuple[int, int]:
    """(thread rows, heads per thread) covering ``heads`` query heads with at most ``per_thread``
    heads per thread, balanced (6 -> 2 x 3, not 4 + 2)."""
    slices = -(-heads // per_thread)
    return slices, -(-heads // slices)


def decode_pipeline_shape(kind: int, head_dim: int, group: int, pair_hooks: bool = False) -> DecodePipelineShape:
    """GPU: ~128 threads, (head_dim/8 lanes) x (head rows, each holding up to 4 of the group's heads,
    <= 8 heads per pass; 2 with ``pair_hooks``, the rope-style partner loads) x token rows, 2 stages of
    up to 32 tokens within 32 KB of K/V buffers. Simulator: up to 4 heads per pass as 2 x 2, 2 token
    rows x 2 tokens per row."""
    lanes = lanes_per_row(head_dim)
    if SIMULATOR:
        slices, per_thread = split_heads(min(group, 4), 2)
        return DecodePipelineShape(lanes, slices, 2, 2, 2, per_thread)
    per_thread_limit = 2 if pair_hooks else PIPELINE_HEADS_PER_THREAD  # rope: the partner rows take registers
    slices, per_thread = split_heads(min(group, PIPELINE_MAX_HEADS), per_thread_limit)
    rows = max(1, GPU_THREADS // (lanes * slices))
    row_bytes = head_dim * (4 if kind == 2 else 2)  # primitives.F32 == 2
    stages = 2
    tokens = max(rows, min(PIPELINE_STAGE_TOKENS, PIPELINE_TILE_BYTES // (2 * stages * row_bytes)))
    # a row group's scores (heads per thread x tokens per row) at most one per lane and <= 16 (registers
    # and the reduction buffer); tokens per row a power of two (the stage max runs over aligned lane groups)
    per_row = max(1, min(tokens // rows, min(PIPELINE_MAX_SCORES, lanes) // per_thread))
    return DecodePipelineShape(lanes, slices, rows, 1 << (per_row.bit_length() - 1), stages, per_thread)


#: registers per thread the decode kernels are held to (compile-check's sm_90 budget, perf_budgets.json)
DECODE_REGISTER_BUDGET = 128
#: resident decode CTAs per SM the default grid aims at: one CTA's barrier waits are covered by the
#: other's copies, and two already keep 2 x 32 KB in flight at bf16 hd128 g4 (16 copies of 16 B per
#: thread x 128 threads), over the ~18 KB (H100) / ~25 KB (H200) Little's law asks for; more CTAs only
#: split more tiles (partial traffic and merge work) for no predicted bandwidth (docs/perf-model.md)
DECODE_TARGET_CTAS_PER_SM = 2
_REGS_PER_SM = 64 * 1024
_REG_UNIT = 256  # registers per warp are allocated in units of 256
_SMEM_PER_SM = 228 * 1024
_SMEM_PER_CTA_RESERVED = 1024
_SMEM_UNIT = 128
_THREADS_PER_SM = 2048


def resident_ctas_per_sm(threads: int, smem_bytes: int, registers: int = DECODE_REGISTER_BUDGET) -> int:
    """CTAs one sm_80/sm_90 SM holds at once: the lowest of the register file (``registers`` per thread,
    allocated per warp in units of 256), shared memory (plus the driver's 1 KB per CTA, 128-byte
    units, 228 KB per SM) and threads (2048)."""
    warps = -(-threads // 32)
    by_regs = _REGS_PER_SM // (-(-registers * 32 // _REG_UNIT) * _REG_UNIT * warps)
    smem = -(-(smem_bytes + _SMEM_PER_CTA_RESERVED) // _SMEM_UNIT) * _SMEM_UNIT
    return max(0, min(by_regs, _SMEM_PER_SM // smem, _THREADS_PER_SM // (warps * 32)))


def decode_ctas_per_sm(threads: int, smem_bytes: int) -> int:
    """Persistent decode CTAs per SM when Settings leave num_ctas None: the resident count of the
    config (registers at the 128 budget, its static shared memory) capped at DECODE_TARGET_CTAS_PER_SM,
    at least 1. Never more than fit: a persistent grid past the resident count runs in waves."""
    return max(1, min(resident_ctas_per_sm(threads, smem_bytes), DECODE_TARGET_CTAS_PER_SM))


#: resident one-warp CTAs per SM the tensor-core decode engine's default grid aims at: four warps to
#: issue (one per SM sub-partition) and 4 x 16 KB of K/V copies in flight at hd128, over what
#: Little's law asks for; its shared memory (two 32-token K/V stages) admits 6 at hd128
DECODE_TENSOR_TARGET_CTAS_PER_SM = 4
#: registers per thread of the tensor-core kernels (compile-check's sm_90 budget for prefill_mma)
TENSOR_CORE_REGISTER_BUDGET = 255


def decode_tensor_ctas_per_sm(threads: int, smem_bytes: int) -> int:
    """Persistent CTAs per SM of the tensor-core decode engine when Settings leave num_ctas None: the
    resident count (registers at the 255 budget, its static shared memory) capped at
    DECODE_TENSOR_TARGET_CTAS_PER_SM, at least 1."""
    resident = resident_ctas_per_sm(threads, smem_bytes, TENSOR_CORE_REGISTER_BUDGET)
    return max(1, min(resident, DECODE_TENSOR_TARGET_CTAS_PER_SM))


@dataclass(frozen=True)
class DecodeEngineChoice:
    """Which decode kernel a group size launches, with the static model's figures behind the choice
    (sm_90, bf16, head_dim 128; warp instructions per K/V byte of the stage loop; predicted % of the
    HBM peak on H100 / H200, the lower of Little's law and the issue ceiling 4 x 1.83 GHz x 132 SMs /
    instr_per_byte, capped at the peak). All figures are predicted, none measured."""

    engine: str  # "cuda_cores": kernels.decode_pipeline; "tensor_cores": kernels.prefill_mma's one-warp shape
    cuda_core_instr_per_byte: float  # read from the SASS (compile-check) or scaled from it (marked ~)
    tensor_core_instr_per_byte: float  # the tensor-core prefill's one-warp shape, read from its SASS
    predicted_h100_h200: tuple[float, float]  # of the chosen engine
    note: str


#: Tensor-core decode (the group's heads as the 16 rows of mma.m16n8k16, FlashInfer's
#: use_tensor_cores), read from compiled code: the one-warp shape of the tensor-core prefill
#: (``prefill_mma[bfloat16,hd128,g4,paged,causal,default,rows16]``, the kernel a decode step would run
#: with qo_len 1 per request) takes 748 instructions on its fast path per warp and 32-token block of
#: K+V (16 KB): 0.046 instr/B, the same for every group <= 16 (rows past the group are padding), with
#: 16 KB of copies in flight per CTA. The CUDA-core pipeline grows with the heads per pass (sm_90
#: SASS): 0.197 at g4, 0.133 at g1 (fp16), 0.400 at g8 (alibi+sinks), 0.479 at g16 (fp16 hd64).
#: H200 saturates below 0.201 instr/B, H100 below 0.288. The engine's own spec
#: (``decode_mma[bfloat16,hd128,g8,default]``: one-token plans, not causal, 4 one-warp CTAs per SM)
#: reads 0.055 instr/B, 170 registers, 64 KB of copies in flight per SM, no spills on sm_80 or sm_90.
#: Decision: group <= 4 stays on CUDA cores (predicted at the HBM peak on both GPUs, exact fp32 dot
#: products, every hook); group >= 5 (float16 / bfloat16) runs on tensor cores: BatchDecode then plans
#: its batch as one-token prefill requests (runtime.decode, Settings.decode_engine) and launches that
#: one-warp shape. float32 has no mma inputs and stays on CUDA cores at every group.
DECODE_ENGINES: dict[str, DecodeEngineChoice] = {
    "g1-4": DecodeEngineChoice("cuda_cores", 0.197, 0.046, (1.00, 1.00),
                               "at the HBM roof by the model; tensor cores predict no gain"),
    "g5-64": DecodeEngineChoice("tensor_cores", 0.400, 0.055, (1.00, 1.00),
                                "CUDA cores predicted 0.72 / 0.50 of peak at g8 and less beyond; tensor cores "
                                "at the HBM roof (rows past the group are padding up to 16, passes beyond)"),
}  # fmt: skip


def decode_engine(group: int) -> DecodeEngineChoice:
    """The decode engine (and its predicted figures) for a GQA group size."""
    return DECODE_ENGINES["g1-4" if group <= 4 else "g5-64"]


DECODE_ENGINE_NAMES = ("cuda_cores", "tensor_cores")


def decode_engine_name(kind: int, head_dim: int, group: int, requested: str = "auto") -> str:
    """The decode kernel BatchDecode launches: ``requested`` ("cuda_cores" / "tensor_cores", from
    Settings.decode_engine) as given, or for "auto" the table's choice for ``group`` when the dtype
    ``kind`` has mma inputs (float16 / bfloat16, head_dim % 16 == 0), else CUDA cores."""
    if requested in DECODE_ENGINE_NAMES:
        return requested
    if requested != "auto":
        raise ValueError(f"decode engine must be 'auto' or one of {DECODE_ENGINE_NAMES}, got {requested!r}")
    if kind not in (0, 1) or head_dim % 16:  # primitives.F16 == 0, BF16 == 1
        return "cuda_cores"
    return decode_engine(group).engine
