"""Attention-state merge kernels: pairs, S states per row, and the split-KV decode partials.

A *state* is a normalized attention output row ``v`` [head_dim] with its log-sum-exp ``s`` (a
**natural log**; FlashInfer's is base 2). Merging states i: m = max_i s_i, w_i = exp(s_i - m),
v = sum_i w_i v_i / sum_i w_i, s = m + log(sum_i w_i). A state with s = -inf contributes nothing;
when every state is -inf the result is zeros and -inf.

Thread block (BDX, BDY): each of the BDY thread rows owns one output row at a time (a persistent
loop over rows), its BDX lanes walk head_dim in 8-element vectors (``load_row8``: one or two
16-byte loads). No shared memory or warp collectives; the pair kernel (which also serves the
in-place op) has one barrier per row step. Compute is fp32; weights use ``ex2`` with a log2(e)
factor on *differences* of natural LSEs; the output LSE uses ``math.log``.

Compile-time specialization: only the value dtype code (``primitives.F16/BF16/F32``). head_dim,
row counts, the GQA group size and num_qo_heads are run-time scalars, so every kernel here has
exactly one compiled variant per dtype. The block shape depends on head_dim (``merge_block``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from numba import float32, int64

from tilegraph._device import cuda
from tilegraph.planner.layout import H_BATCH_SIZE, H_NUM_MERGES

from . import primitives as prim
from .args import F32, I32, U8, KernelArgs
from .hooks import DTYPE_NAMES, NEG_INF
from .hooks import LOG2E as HOOKS_LOG2E
from .hooks import identity_vec as _identity_vec
from .hooks import no_sink as _no_sink
from .launch import as_words, launch
from .nan import NAN_PTX, fastmath_flags, nan_max
from .tuning import MERGE_MAX_LANES as MAX_LANES  # noqa: F401  (lanes per merged row; tests read it here)
from .tuning import merge_block, merge_max_grid

if TYPE_CHECKING:
    from .compile_spec import CompileSpec

LOG2E = float32(HOOKS_LOG2E)  # as a float32 constant (a Python float would type as float64 in the kernel)
PAIR_ARGS = KernelArgs("merge_state", (
    ("a_words", I32), ("a_lse", F32), ("b_words", I32), ("b_lse", F32), ("out_words", I32), ("out_lse", F32),
    ("mask", U8), ("use_mask", "int32"), ("num_rows", "int64"), ("heads", "int64"), ("head_dim", "int64"),
))  # fmt: skip
STATES_ARGS = KernelArgs("merge_states", (
    ("v_words", I32), ("lse", F32), ("out_words", I32), ("out_lse", F32),
    ("num_rows", "int64"), ("num_states", "int64"), ("heads", "int64"), ("head_dim", "int64"),
))  # fmt: skip
PARTIAL_MERGE_ARGS = KernelArgs("partial_merge", (
    ("header", I32), ("merge_slot_indptr", I32), ("merge_request", I32), ("merge_kv_head", I32),
    ("partial_words", I32), ("partial_lse", F32), ("out_words", I32), ("lse", F32), ("write_lse", "int32"),
    ("group_size", "int64"), ("head_dim", "int64"), ("num_qo_heads", "int64"),
    ("kv_len", I32), ("params", F32), ("qo_indptr", I32),
))  # fmt: skip


# ---- reusable device helpers ------------------------------------------------------------------


@cuda.jit(device=True, inline="always")
def merge_fold(m, d, acc, lse, v8):
    """Fold one state into a running merge; return the new (m, d).

    m: float32 running max of natural LSEs (-inf: empty); d: float32 sum of weights exp(s_i - m);
    acc: float32[8] sum of w_i * v_i (in place); lse: the state's natural LSE (-inf: skipped);
    v8: float32[8], 8 elements of the state's normalized output. A NaN LSE is folded in (it must
    show); a -inf state is selected out, its values never read into the sum."""
    if not (lse == NEG_INF):
        m_new = nan_max(m, lse)
        scale = prim.ex2((m - m_new) * LOG2E)
        weight = prim.ex2((lse - m_new) * LOG2E)
        d = d * scale + weight
        for k in range(8):
            acc[k] = acc[k] * scale + weight * v8[k]
        m = m_new
    return m, d


@cuda.jit(device=True, inline="always")
def merge_finish(m, d, acc):
    """Normalize ``acc`` [8] in place (zeros when nothing was folded in); return the natural LSE."""
    if d > float32(0.0) or d != d:
        inv = float32(1.0) / d
        for k in range(8):
            acc[k] *= inv
        return float32(m + float32(math.log(d)))
    for k in range(8):
        acc[k] = float32(0.0)
    return NEG_INF


def _grid_for_rows(num_rows: int, rows_per_block: int) -> int:
    return max(1, min(-(-num_rows // rows_per_block), merge_max_grid()))


# ---- kernel templates (plain Python functions: cuda.jit them to launch, compile_ptx to check) ---


def make_pair_kernel(kind: int) -> Callable[..., Any]:
    """Kernel merging state a with state b per row, out = merge(a, b); rows with mask 0 are skipped.

    a_words / b_words / out_words: int32 word views of [num_rows, head_dim] values (dtype ``kind``;
    out may alias a for the in-place op: each value element is read, then written, by one thread
    only, and a barrier orders every lane's LSE read before the LSE write; out_lse may alias a_lse);
    a_lse / b_lse / out_lse: float32 [num_rows]; mask: uint8 [num_rows // heads] read only when
    use_mask != 0 (row r belongs to mask entry r // heads)."""
    KIND = kind
    WORDS8 = prim.words_per_row8(kind)
    load_row8, store_row8 = prim.load_row8, prim.store_row8

    def merge_pair_kernel(
        a_words, a_lse, b_words, b_lse, out_words, out_lse, mask, use_mask, num_rows, heads, head_dim
    ):  # fmt: skip
        tx = cuda.threadIdx.x
        bdx = cuda.blockDim.x
        bdy = cuda.blockDim.y
        lanes = int64(head_dim // 8)
        row_words = lanes * WORDS8
        acc = cuda.local.array(8, float32)
        v8 = cuda.local.array(8, float32)
        # block-uniform trip count: every thread reaches the barrier equally often
        for first_row in range(int64(cuda.blockIdx.x * bdy), int64(num_rows), int64(cuda.gridDim.x * bdy)):
            row = first_row + cuda.threadIdx.y
            live = row < num_rows
            if live and use_mask != 0:
                live = mask[row // heads] != 0
            lse_a = NEG_INF
            lse_b = NEG_INF
            if live:
                lse_a = a_lse[row]
                lse_b = b_lse[row]
            # in place out_lse is a_lse: all lanes of a row read it before lane 0 overwrites it
            cuda.syncthreads()
            if not live:
                continue
            for vec in range(int64(tx), lanes, int64(bdx)):
                w0 = row * row_words + vec * WORDS8
                m = NEG_INF
                d = float32(0.0)
                for k in range(8):
                    acc[k] = float32(0.0)
                load_row8(a_words, w0, KIND, v8)
                m, d = merge_fold(m, d, acc, lse_a, v8)
                load_row8(b_words, w0, KIND, v8)
                m, d = merge_fold(m, d, acc, lse_b, v8)
                lse_out = merge_finish(m, d, acc)
                store_row8(out_words, w0, KIND, acc)
                if vec == 0:
                    out_lse[row] = lse_out

    return PAIR_ARGS.check(merge_pair_kernel)


def make_states_kernel(kind: int) -> Callable[..., Any]:
    """Kernel merging ``num_states`` states per output row, in order.

    v_words: int32 word view of [N, num_states, heads, head_dim] values (dtype ``kind``);
    lse: float32 [N, num_states, heads]; out_words: [N, heads, head_dim]; out_lse: float32 [N, heads].
    num_rows = N * heads."""
    KIND = kind
    WORDS8 = prim.words_per_row8(kind)
    load_row8, store_row8 = prim.load_row8, prim.store_row8

    def merge_states_kernel(v_words, lse, out_words, out_lse, num_rows, num_states, heads, head_dim):
        tx = cuda.threadIdx.x
        bdx = cuda.blockDim.x
        bdy = cuda.blockDim.y
        lanes = int64(head_dim // 8)
        row_words = lanes * WORDS8
        acc = cuda.local.array(8, float32)
        v8 = cuda.local.array(8, float32)
        for row in range(int64(cuda.blockIdx.x * bdy + cuda.threadIdx.y), int64(num_rows), int64(cuda.gridDim.x * bdy)):
            n = row // heads
            h = row - n * heads
            for vec in range(int64(tx), lanes, int64(bdx)):
                m = NEG_INF
                d = float32(0.0)
                for k in range(8):
                    acc[k] = float32(0.0)
                for state in range(int64(num_states)):
                    in_row = (n * num_states + state) * heads + h
                    load_row8(v_words, in_row * row_words + vec * WORDS8, KIND, v8)
                    m, d = merge_fold(m, d, acc, lse[in_row], v8)
                lse_out = merge_finish(m, d, acc)
                store_row8(out_words, row * row_words + vec * WORDS8, KIND, acc)
                if vec == 0:
                    out_lse[row] = lse_out

    return STATES_ARGS.check(merge_states_kernel)


def make_partial_merge_kernel(kind: int, hooks: Any = None, prefill: bool = False) -> Callable[..., Any]:
    """Kernel combining split-KV decode partials into the final output (fixed grid, persistent).

    Work item i = (merge entry m = i // group_size, group member j = i % group_size) for
    m < header[H_NUM_MERGES] (read on the device; clamped to the merge_request capacity). It folds
    slots merge_slot_indptr[m] : [m+1] in order -- partial_words (int32 view of float32
    [slots, group_size, head_dim]) and partial_lse (float32 [slots, group_size], natural log) -- and
    writes row request * num_qo_heads + kv_head * group_size + j of out_words (dtype ``kind``,
    [B, num_qo_heads, head_dim]) and, when write_lse != 0, of lse (float32 [B * num_qo_heads]).
    Rows no merge entry names are not touched. Slots and rows past the buffers are ignored.

    ``hooks`` (a kernels.hooks.AttentionHooks, None: plain softmax) adds what a variant needs here:
    softmax=False sums the partials (LSE written as 0); ``sink`` joins each merged row once as a
    state (zeros, LSE = sink); ``output_transform`` runs on the merged row. Those read kv_len
    (int32 [B], for qo_pos = kv_len - 1) and params (float32, the variant's run-time parameters).

    ``prefill``: merge_request names a global query token g (a row of q / out), not a request; the
    output hook then gets the request r owning g (found in qo_indptr, int32 [B + 1], B =
    header[H_BATCH_SIZE]) and qo_pos = kv_len[r] - qo_len[r] + (g - qo_indptr[r]). qo_indptr is
    read only then (decode passes any int32 array)."""
    KIND = kind
    PREFILL = bool(prefill)
    SOFTMAX = hooks is None or hooks.softmax
    HAS_SINK = hooks is not None and hooks.sink is not None
    HAS_OUT = hooks is not None and hooks.output_transform is not None
    sink_hook = hooks.sink if HAS_SINK else _no_sink
    o_hook = hooks.output_transform if HAS_OUT else _identity_vec
    WORDS8 = prim.words_per_row8(kind)
    F32_WORDS8 = prim.words_per_row8(prim.F32)
    load_row8, store_row8 = prim.load_row8, prim.store_row8

    def partial_merge_kernel(
        header, merge_slot_indptr, merge_request, merge_kv_head, partial_words, partial_lse,
        out_words, lse, write_lse, group_size, head_dim, num_qo_heads, kv_len, params, qo_indptr,
    ):  # fmt: skip
        tx = cuda.threadIdx.x
        bdx = cuda.blockDim.x
        bdy = cuda.blockDim.y
        lanes = int64(head_dim // 8)
        row_words = lanes * WORDS8
        part_row_words = lanes * F32_WORDS8
        group = int64(group_size)
        num_merges = int64(min(header[H_NUM_MERGES], merge_request.shape[0]))
        slot_limit = int64(partial_lse.shape[0]) // group
        out_rows = int64(out_words.shape[0]) // row_words
        acc = cuda.local.array(8, float32)
        v8 = cuda.local.array(8, float32)
        num_items = num_merges * group
        for item in range(int64(cuda.blockIdx.x * bdy + cuda.threadIdx.y), num_items, int64(cuda.gridDim.x * bdy)):
            merge = item // group
            j = item - merge * group
            request = int64(merge_request[merge])
            qo_head = int64(merge_kv_head[merge]) * group + j
            out_row = request * num_qo_heads + qo_head
            if out_row < 0 or out_row >= out_rows:
                continue
            hook_request = request
            qo_pos = int64(0)
            if HAS_OUT:
                if PREFILL:
                    # the request owning query token `request`: the last r with qo_indptr[r] <= token
                    lo = int64(0)
                    hi = int64(header[H_BATCH_SIZE]) - 1
                    while lo < hi:
                        mid = (lo + hi + 1) // 2
                        if int64(qo_indptr[mid]) <= request:
                            lo = mid
                        else:
                            hi = mid - 1
                    hook_request = lo
                    qo_begin = int64(qo_indptr[lo])
                    qo_pos = int64(kv_len[lo]) - (int64(qo_indptr[lo + 1]) - qo_begin) + request - qo_begin
                else:
                    qo_pos = int64(kv_len[request]) - 1
            slot_start = int64(merge_slot_indptr[merge])
            slot_stop = min(int64(merge_slot_indptr[merge + 1]), slot_limit)
            for vec in range(int64(tx), lanes, int64(bdx)):
                m = NEG_INF
                d = float32(0.0)
                for k in range(8):
                    acc[k] = float32(0.0)
                for slot in range(slot_start, slot_stop):
                    part_row = slot * group + j
                    load_row8(partial_words, part_row * part_row_words + vec * F32_WORDS8, prim.F32, v8)
                    if SOFTMAX:
                        m, d = merge_fold(m, d, acc, partial_lse[part_row], v8)
                    else:
                        for k in range(8):
                            acc[k] += v8[k]
                if SOFTMAX:
                    if HAS_SINK:
                        for k in range(8):
                            v8[k] = float32(0.0)
                        m, d = merge_fold(m, d, acc, float32(sink_hook(qo_head, params)), v8)
                    lse_out = merge_finish(m, d, acc)
                else:
                    lse_out = float32(0.0)
                if HAS_OUT:
                    o_hook(acc, vec * 8, hook_request, qo_head, qo_pos, params)
                store_row8(out_words, out_row * row_words + vec * WORDS8, KIND, acc)
                if vec == 0 and write_lse != 0:
                    lse[out_row] = lse_out

    return PARTIAL_MERGE_ARGS.check(partial_merge_kernel)


# ---- compiled kernels: one per dtype code, compiled on first launch -----------------------------


@lru_cache(maxsize=None)
def pair_kernel(kind: int) -> Any:
    return cuda.jit(make_pair_kernel(kind), fastmath=fastmath_flags())


@lru_cache(maxsize=None)
def states_kernel(kind: int) -> Any:
    return cuda.jit(make_states_kernel(kind), fastmath=fastmath_flags())


@lru_cache(maxsize=64)
def partial_merge_kernel(kind: int, hooks: Any = None, prefill: bool = False) -> Any:
    """The launchable partial-merge kernel for output dtype code ``kind`` (see make_partial_merge_kernel)."""
    return cuda.jit(make_partial_merge_kernel(kind, hooks, prefill), fastmath=fastmath_flags())


# ---- launchers (torch tensors in; no checks here: runtime/merge.py validates) ------------------


def launch_pair(
    kind: int,
    a: torch.Tensor,
    a_lse: torch.Tensor,
    b: torch.Tensor,
    b_lse: torch.Tensor,
    out: torch.Tensor,
    out_lse: torch.Tensor,
    mask_u8: torch.Tensor | None,
) -> None:
    """a, b, out: contiguous 16-byte aligned [N, H, D] of dtype ``kind`` (out may be a); *_lse:
    float32 [N, H]; mask_u8: uint8 [N] or None."""
    n, heads, head_dim = a.shape
    num_rows = n * heads
    if num_rows == 0:
        return
    bdx, bdy = merge_block(head_dim)
    use_mask = mask_u8 is not None
    mask_arg = mask_u8 if use_mask else out_lse.view(torch.uint8)  # never read: any uint8 view will do
    launch(
        "merge_state",
        pair_kernel(kind),
        (_grid_for_rows(num_rows, bdy),),
        (bdx, bdy),
        PAIR_ARGS.values(
            a_words=as_words(a), a_lse=a_lse.view(-1), b_words=as_words(b), b_lse=b_lse.view(-1),
            out_words=as_words(out), out_lse=out_lse.view(-1), mask=mask_arg, use_mask=np.int32(use_mask),
            num_rows=np.int64(num_rows), heads=np.int64(heads), head_dim=np.int64(head_dim),
        ),
    )  # fmt: skip


def launch_states(kind: int, v: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, out_lse: torch.Tensor) -> None:
    """v: contiguous aligned [N, S, H, D] (dtype ``kind``), lse float32 [N, S, H]; out [N, H, D], out_lse [N, H]."""
    n, num_states, heads, head_dim = v.shape
    num_rows = n * heads
    if num_rows == 0:
        return
    bdx, bdy = merge_block(head_dim)
    launch(
        "merge_states",
        states_kernel(kind),
        (_grid_for_rows(num_rows, bdy),),
        (bdx, bdy),
        STATES_ARGS.values(
            v_words=as_words(v), lse=lse.view(-1), out_words=as_words(out), out_lse=out_lse.view(-1),
            num_rows=np.int64(num_rows), num_states=np.int64(num_states), heads=np.int64(heads), head_dim=np.int64(head_dim),
        ),
    )  # fmt: skip


def launch_partial_merge(
    *,
    kind: int,
    head_dim: int,
    group_size: int,
    header: torch.Tensor,
    merge_slot_indptr: torch.Tensor,
    merge_request: torch.Tensor,
    merge_kv_head: torch.Tensor,
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    out_words: torch.Tensor,
    lse: torch.Tensor,
    write_lse: bool,
    num_qo_heads: int,
    grid: int,
    hooks: Any = None,
    kv_len: torch.Tensor | None = None,
    params: torch.Tensor | None = None,
    qo_indptr: torch.Tensor | None = None,
) -> None:
    """Combine the split-KV partials named by the plan into ``out`` (and ``lse``); CUDA-graph safe.

    header, merge_*: int32 section views of the plan buffer (planner.layout); partial_out float32
    (flat [slot_capacity * group_size * head_dim]), partial_lse float32 (flat, natural log);
    out_words: int32 word view of the contiguous [B, num_qo_heads, head_dim] output (dtype ``kind``);
    lse: float32 flat [B * num_qo_heads] (any float32 tensor when ``write_lse`` is False).
    The launch shape depends only on ``grid`` and head_dim: the number of merges is read from
    header[H_NUM_MERGES] on the device, so one launch serves every plan. ``hooks`` / ``kv_len`` /
    ``params``: a variant's merge-side hooks and their inputs (see make_partial_merge_kernel).
    ``qo_indptr`` (the prefill plan's section): merge rows are query tokens (prefill merges)."""
    launch(
        "partial_merge",
        partial_merge_kernel(kind, hooks, qo_indptr is not None),
        (int(grid),),
        merge_block(head_dim),
        PARTIAL_MERGE_ARGS.values(
            header=header, merge_slot_indptr=merge_slot_indptr, merge_request=merge_request, merge_kv_head=merge_kv_head,
            partial_words=as_words(partial_out), partial_lse=partial_lse.view(-1), out_words=out_words, lse=lse.view(-1),
            write_lse=np.int32(bool(write_lse)), group_size=np.int64(group_size), head_dim=np.int64(head_dim),
            num_qo_heads=np.int64(num_qo_heads), kv_len=merge_request if kv_len is None else kv_len,
            params=partial_lse.view(-1) if params is None else params,
            qo_indptr=merge_request if qo_indptr is None else qo_indptr,
        ),
    )  # fmt: skip


# ---- driverless GPU compile check ------------------------------------------------------------

PAIR_SIGNATURE = PAIR_ARGS.signature
STATES_SIGNATURE = STATES_ARGS.signature
PARTIAL_MERGE_SIGNATURE = PARTIAL_MERGE_ARGS.signature


def gpu_compile_specs() -> list[CompileSpec]:
    """Every kernel here for every dtype (the only compile-time axis)."""
    from .compile_spec import CompileSpec

    expect = ("ld.global.nc.v4.u32", "ex2.approx", NAN_PTX)
    specs = []
    for kind, dtype in DTYPE_NAMES.items():
        for name, make, signature in (
            ("merge_pair", make_pair_kernel, PAIR_SIGNATURE),
            ("merge_states", make_states_kernel, STATES_SIGNATURE),
            ("partial_merge", make_partial_merge_kernel, PARTIAL_MERGE_SIGNATURE),
        ):
            specs.append(CompileSpec(name=f"{name}[{dtype}]", pyfunc=make(kind), signature=signature, expect=expect,
                                     fastmath=fastmath_flags()))  # fmt: skip
    return specs
