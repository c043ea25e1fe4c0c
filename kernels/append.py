"""KV append: copy each new token's K and V rows into its slot of the paged cache.

A pure copy needs no conversion, so the kernel moves raw int32 words, 16 bytes at a time
(``ld.global.nc.v4.u32`` / ``st.global.v4.u32``). One source covers every dtype, head_dim and
layout: those only change the word strides, which arrive as run-time scalars.

Thread block (BX, BY, BZ): x walks the 16-byte chunks of a head row, y the KV heads, z the tokens
of the CTA (grid = ceil(nnz / BZ)). A row is skipped -- nothing written -- when its batch index is
negative (padding), its request is outside the page table, its position is negative or beyond
the request's pages, or its page index is outside the cache. So the kernel never writes outside
the pages the page table gives the row's request, whatever the index contents.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

from numba import int64

from tilegraph._device import SIMULATOR, cuda

from . import primitives as prim
from .args import I32, KernelArgs
from .tuning import append_threads

if TYPE_CHECKING:
    from .compile_spec import CompileSpec

WORDS_PER_CHUNK = 4  # int32 words in one 16-byte load/store

APPEND_ARGS = KernelArgs("append_kv", (
    ("k_words", I32), ("k_token_stride", "int64"), ("k_head_stride", "int64"),
    ("v_words", I32), ("v_token_stride", "int64"), ("v_head_stride", "int64"),
    ("batch_indices", I32), ("positions", I32), ("kv_indptr", I32), ("kv_indices", I32),
    ("k_cache_words", I32), ("v_cache_words", I32), ("page_stride", "int64"), ("token_stride", "int64"),
    ("head_stride", "int64"), ("page_size", "int64"), ("num_pages", "int64"), ("num_kv_heads", "int64"),
    ("row_words", "int64"),
))  # fmt: skip
#: vLLM's reshape_and_cache addressing: row i goes to flat slot slot_mapping[i] = page * page_size + offset
SLOT_APPEND_ARGS = KernelArgs("append_kv_slots", (
    ("k_words", I32), ("k_token_stride", "int64"), ("k_head_stride", "int64"),
    ("v_words", I32), ("v_token_stride", "int64"), ("v_head_stride", "int64"),
    ("slot_mapping", "int64[::1]"),
    ("k_cache_words", I32), ("v_cache_words", I32), ("page_stride", "int64"), ("token_stride", "int64"),
    ("head_stride", "int64"), ("page_size", "int64"), ("num_pages", "int64"), ("num_kv_heads", "int64"),
    ("row_words", "int64"),
))  # fmt: skip

if SIMULATOR:

    def store_16b(words, i, value):
        """words[i:i+4] = value (4 int32 words); i must be 16-byte aligned."""
        if i % 4:
            raise IndexError(f"store_16b: word index {i} is not 16-byte aligned")
        words[i], words[i + 1], words[i + 2], words[i + 3] = value

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    @intrinsic
    def store_16b(typingctx, words, index, value):
        """words[index:index+4] = value (a 4-tuple of int32) via st.global.v4.u32."""
        if not (isinstance(words, types.Array) and words.ndim == 1 and words.dtype == types.int32):
            return None
        if not isinstance(index, types.Integer) or value != types.UniTuple(types.int32, 4):
            return None

        def codegen(context, builder, sig, args):
            ary_ty, idx_ty, _ = sig.args
            ary, idx, val = args
            ary_struct = context.make_array(ary_ty)(context, builder, value=ary)
            idx64 = context.cast(builder, idx, idx_ty, types.int64)
            ptr = cgutils.get_item_pointer(context, builder, ary_ty, ary_struct, [idx64], wraparound=False)
            i32 = ir.IntType(32)
            parts = [builder.extract_value(val, k) for k in range(4)]
            fn_type = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32, i32])
            text = "st.global.v4.u32 [$0], {$1, $2, $3, $4};"
            builder.call(ir.InlineAsm(fn_type, text, "l,r,r,r,r,~{memory}", side_effect=True), [ptr, *parts])
            return context.get_dummy_value()

        return types.void(words, index, value), codegen


@dataclass(frozen=True)
class AppendLaunch:
    """Launch shape for ``nnz`` tokens: fixed for a fixed nnz (a CUDA-graph bucket)."""

    grid: tuple[int]
    block: tuple[int, int, int]


def append_launch(nnz: int, num_kv_heads: int, row_words: int, threads: int) -> AppendLaunch:
    """About ``threads`` threads per CTA: whole rows of 16-byte chunks (at most a warp of them),
    then heads, then tokens. ``row_words`` = int32 words in one head row (a multiple of 4)."""
    chunks = row_words // WORDS_PER_CHUNK
    bx = min(chunks, prim.WARP_SIZE)
    by = max(1, min(num_kv_heads, threads // bx))
    bz = max(1, min(nnz, threads // (bx * by)))
    return AppendLaunch(grid=(-(-nnz // bz),), block=(bx, by, bz))


def default_threads() -> int:
    """Target threads per CTA (kernels.tuning.append_threads)."""
    return append_threads()


def make_copy_token() -> Callable[..., Any]:
    """Device function: copy token ``token``'s K and V rows (every head) to cache words at ``slot``
    (the word offset of its (page, position-in-page)), 16 bytes per thread per step."""
    load_16b = prim.load_16b
    CHUNK = WORDS_PER_CHUNK

    @cuda.jit(device=True, inline="always")
    def copy_token(k_words, k_token_stride, k_head_stride, v_words, v_token_stride, v_head_stride,
                   k_cache_words, v_cache_words, slot, head_stride, num_kv_heads, row_words, token):  # fmt: skip
        w_start = int64(cuda.threadIdx.x) * CHUNK
        w_step = int64(cuda.blockDim.x) * CHUNK
        for head in range(int64(cuda.threadIdx.y), num_kv_heads, int64(cuda.blockDim.y)):
            dst = slot + head * head_stride
            k_src = token * k_token_stride + head * k_head_stride
            v_src = token * v_token_stride + head * v_head_stride
            for w in range(w_start, row_words, w_step):
                store_16b(k_cache_words, dst + w, load_16b(k_words, k_src + w))
                store_16b(v_cache_words, dst + w, load_16b(v_words, v_src + w))

    return copy_token


def make_slot_append_kernel() -> Callable[..., Any]:
    """The plain Python kernel of ``append_kv_slots`` (same launch shape and copy as append_kv):
    row i goes to page ``slot_mapping[i] // page_size``, position ``slot_mapping[i] % page_size``; a
    negative slot (padding) or a page outside the cache is skipped."""
    copy_token = make_copy_token()

    def append_kv_slots_kernel(
        k_words, k_token_stride, k_head_stride,
        v_words, v_token_stride, v_head_stride,
        slot_mapping,
        k_cache_words, v_cache_words, page_stride, token_stride, head_stride,
        page_size, num_pages, num_kv_heads, row_words,
    ):  # fmt: skip
        token = int64(cuda.blockIdx.x) * int64(cuda.blockDim.z) + int64(cuda.threadIdx.z)
        if token >= slot_mapping.shape[0]:
            return
        flat = int64(slot_mapping[token])
        if flat < 0:
            return
        page = flat // page_size
        if page >= num_pages:
            return
        slot = page * page_stride + (flat - page * page_size) * token_stride
        copy_token(k_words, k_token_stride, k_head_stride, v_words, v_token_stride, v_head_stride,
                   k_cache_words, v_cache_words, slot, head_stride, num_kv_heads, row_words, token)  # fmt: skip

    return SLOT_APPEND_ARGS.check(append_kv_slots_kernel)


def make_append_kernel() -> Callable[..., Any]:
    """The plain Python kernel function (cuda.jit it to launch, compile_ptx to check).

    Arguments (word = int32; strides and offsets in words, int64):
        k_words, k_token_stride, k_head_stride      new K rows: token t, head h at t*ts + h*hs
        v_words, v_token_stride, v_head_stride      new V rows, same
        batch_indices [nnz], positions [nnz]         int32; batch index < 0 marks a padded row
        kv_indptr [B+1], kv_indices [pages]          int32 page table
        k_cache_words, v_cache_words                 slot (page, s, head) at page*ps + s*ts + head*hs
        page_stride, token_stride, head_stride       of the cache
        page_size, num_pages, num_kv_heads, row_words
    """
    copy_token = make_copy_token()

    def append_kv_kernel(
        k_words, k_token_stride, k_head_stride,
        v_words, v_token_stride, v_head_stride,
        batch_indices, positions, kv_indptr, kv_indices,
        k_cache_words, v_cache_words, page_stride, token_stride, head_stride,
        page_size, num_pages, num_kv_heads, row_words,
    ):  # fmt: skip
        token = int64(cuda.blockIdx.x) * int64(cuda.blockDim.z) + int64(cuda.threadIdx.z)
        if token >= batch_indices.shape[0]:
            return
        request = int64(batch_indices[token])
        if request < 0 or request + 1 >= kv_indptr.shape[0]:
            return
        pos = int64(positions[token])
        first = int64(kv_indptr[request])
        entry = first + pos // page_size
        if pos < 0 or first < 0 or entry >= int64(kv_indptr[request + 1]) or entry >= kv_indices.shape[0]:
            return
        page = int64(kv_indices[entry])
        if page < 0 or page >= num_pages:
            return
        slot = page * page_stride + (pos % page_size) * token_stride
        copy_token(k_words, k_token_stride, k_head_stride, v_words, v_token_stride, v_head_stride,
                   k_cache_words, v_cache_words, slot, head_stride, num_kv_heads, row_words, token)  # fmt: skip

    return APPEND_ARGS.check(append_kv_kernel)


@lru_cache(maxsize=None)
def append_kv_kernel() -> Any:
    """The launchable kernel: compiled once per process (on first launch)."""
    return cuda.jit(make_append_kernel())


@lru_cache(maxsize=None)
def append_kv_slots_kernel() -> Any:
    """The launchable slot-mapped kernel: compiled once per process (on first launch)."""
    return cuda.jit(make_slot_append_kernel())


def append_signature() -> str:
    """The numba signature of the append kernel (from APPEND_ARGS)."""
    return APPEND_ARGS.signature


def gpu_compile_specs() -> list[CompileSpec]:
    """One spec covers every dtype, head_dim and layout (NHD, HND, (k, v) pairs): the kernel copies
    raw words and receives every stride at run time, so there is exactly one specialization."""
    from .compile_spec import CompileSpec

    return [
        CompileSpec(
            name="append_kv[any dtype, any head_dim, NHD|HND|pair]",
            pyfunc=make_append_kernel(),
            signature=append_signature(),
            expect=("ld.global.nc.v4.u32", "st.global.v4.u32"),
        ),
        CompileSpec(
            name="append_kv_slots[any dtype, any head_dim, NHD|HND|pair|packed views]",
            pyfunc=make_slot_append_kernel(),
            signature=SLOT_APPEND_ARGS.signature,
            expect=("ld.global.nc.v4.u32", "st.global.v4.u32"),
        ),
    ]
