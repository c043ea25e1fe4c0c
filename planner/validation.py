"""Input validation every planner shares: index arrays as int32 host arrays, the page-table check
(njit, folded into the planners' cores) and its error codes turned into typed errors."""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch
from numba import carray, njit, types
from numba.core.extending import intrinsic, overload

from tilegraph.errors import InputError, PlanError

from .layout import DECODE_SECTIONS, DecodeLayout

INT32_MAX = 2**31 - 1

# result words of the njit core
R_ERROR, R_INDEX, R_VALUE, R_TILES, R_MERGES, R_SLOTS, R_MAKESPAN, R_MAX_PAGE, R_KV_TOKENS = range(9)
R_WORDS = 9

# validation error codes
E_INDPTR_START, E_INDPTR_DECREASING, E_INDPTR_END, E_PAGE_REFS = 1, 2, 3, 4
E_LAST_PAGE_LEN, E_PAGE_INDEX, E_KV_LEN, E_CAPACITY = 5, 6, 7, 8
E_SEQ_LEN, E_BLOCKS, E_BLOCK_SPAN = 9, 10, 11


# the page-table sections validate_page_table writes (indices into the planner's offsets array)
S_KV_INDPTR, S_KV_INDICES, S_KV_LEN = (DECODE_SECTIONS.index(n) for n in ("kv_indptr", "kv_indices", "kv_len"))


def as_index_array(value: Any, name: str) -> np.ndarray:
    """An int32 1-D CPU torch tensor or numpy array as a numpy array (no copy); InputError naming
    ``name`` otherwise (the planner never reads device memory)."""
    if isinstance(value, torch.Tensor):
        if value.dtype is not torch.int32:
            raise InputError(f"{name} must be int32, got {value.dtype}")
        if not value.is_cpu:
            raise InputError(f"{name} must be on the CPU (the planner never reads device memory), got {value.device}")
        array = value.numpy()
    elif isinstance(value, np.ndarray):
        array = value
        if array.dtype != np.int32:
            raise InputError(f"{name} must be int32, got {array.dtype}")
    else:
        raise InputError(f"{name} must be an int32 CPU torch.Tensor or numpy array, got {type(value).__name__}")
    if array.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    return array


#: what ``index_input`` returns: an int32 array, or a tensor's (data address, length)
IndexInput = Union[np.ndarray, tuple[int, int]]


def index_input(value: Any, name: str) -> IndexInput:
    """``as_index_array`` for the njit cores, which take either through ``index_view``: a 1-D contiguous
    int32 CPU torch tensor comes as (data address, length), with no numpy view made (``.numpy()``
    took ~1.5 us a tensor, half a small batch's Python around the core); anything else as
    ``as_index_array`` makes it (or its InputError). The caller keeps ``value`` alive for the call."""
    if (isinstance(value, torch.Tensor) and value.dtype is torch.int32 and value.is_cpu and value.dim() == 1
            and value.is_contiguous() and not value.is_neg()):  # fmt: skip
        return value.data_ptr(), value.numel()
    return as_index_array(value, name)


def index_length(view: IndexInput) -> int:
    """Entries of an ``index_input`` result."""
    return view[1] if isinstance(view, tuple) else view.shape[0]


def index_view(view):  # noqa: ANN001, ANN201 -- njit only (overloaded below)
    """In njit code: the int32 array an ``index_input`` result stands for (an array as it is, an
    (address, length) pair as an array over that memory)."""
    raise NotImplementedError("index_view is called from njit code only")


@intrinsic
def _int32_pointer(typingctx, address):
    """An int32 pointer to ``address`` (an integer)."""
    signature = types.CPointer(types.int32)(types.intp)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@overload(index_view)
def _index_view(view):
    if isinstance(view, types.Array):
        return lambda view: view
    if isinstance(view, types.UniTuple) and view.count == 2 and isinstance(view.dtype, types.Integer):
        return lambda view: carray(_int32_pointer(view[0]), (view[1],))
    return None


@njit(cache=True, nogil=True)
def validate_page_lengths(kv_indptr, kv_last_page_len, num_indices, page_size, max_page_refs, buf, off, result):
    """Check a CSR page table's lengths (kv_indptr, kv_last_page_len; ``num_indices`` page ids exist)
    and write kv_len and kv_indptr (each request's first page-id index) into ``buf``. False on an error.

    One loop without a branch; on any error the table is checked again request by request
    (``_page_length_error``), which reports the first one."""
    batch = kv_last_page_len.shape[0]
    kv_len = buf[off[S_KV_LEN] : off[S_KV_LEN] + batch]
    bad = kv_indptr[0] != 0
    for i in range(batch):
        pages = np.int64(kv_indptr[i + 1]) - kv_indptr[i]
        last = np.int64(kv_last_page_len[i])
        tokens = (pages - 1) * page_size + last
        bad |= (pages < 0) | ((pages > 0) & ((last < 1) | (last > page_size) | (tokens > INT32_MAX)))
        kv_len[i] = tokens if pages > 0 else 0
    nnz = np.int64(kv_indptr[batch])
    if bad or nnz > num_indices or nnz > max_page_refs:
        return _page_length_error(kv_indptr, kv_last_page_len, num_indices, page_size, max_page_refs, buf, off, result)
    buf[off[S_KV_INDPTR] : off[S_KV_INDPTR] + batch + 1] = kv_indptr
    return True


@njit(cache=True, nogil=True)
def _page_length_error(kv_indptr, kv_last_page_len, num_indices, page_size, max_page_refs, buf, off, result):
    """``validate_page_lengths`` request by request, in the order its errors are reported."""
    batch = kv_last_page_len.shape[0]
    if kv_indptr[0] != 0:
        result[R_ERROR], result[R_VALUE] = E_INDPTR_START, kv_indptr[0]
        return False
    for i in range(batch):
        if kv_indptr[i + 1] < kv_indptr[i]:
            result[R_ERROR], result[R_INDEX] = E_INDPTR_DECREASING, i
            return False
    nnz = np.int64(kv_indptr[batch])
    if nnz > num_indices:
        result[R_ERROR], result[R_VALUE] = E_INDPTR_END, nnz
        return False
    if nnz > max_page_refs:
        result[R_ERROR], result[R_VALUE] = E_PAGE_REFS, nnz
        return False
    kv_len = buf[off[S_KV_LEN] : off[S_KV_LEN] + batch]
    for i in range(batch):
        pages = np.int64(kv_indptr[i + 1]) - kv_indptr[i]
        last = np.int64(kv_last_page_len[i])
        if pages == 0:
            kv_len[i] = 0
            continue
        if last < 1 or last > page_size:
            result[R_ERROR], result[R_INDEX], result[R_VALUE] = E_LAST_PAGE_LEN, i, last
            return False
        tokens = (pages - 1) * page_size + last
        if tokens > INT32_MAX:
            result[R_ERROR], result[R_INDEX], result[R_VALUE] = E_KV_LEN, i, tokens
            return False
        kv_len[i] = tokens
    buf[off[S_KV_INDPTR] : off[S_KV_INDPTR] + batch + 1] = kv_indptr
    return True


@njit(cache=True, nogil=True)
def validate_page_table(kv_indptr, kv_indices, kv_last_page_len, num_pages, page_size, max_page_refs, buf, off, result):
    """Check the page table and copy it (and the derived kv_len) into ``buf``. False on an error."""
    if not validate_page_lengths(kv_indptr, kv_last_page_len, kv_indices.shape[0], page_size, max_page_refs, buf, off, result):
        return False
    nnz = np.int64(kv_indptr[kv_last_page_len.shape[0]])
    indices = buf[off[S_KV_INDICES] : off[S_KV_INDICES] + nnz]
    top, bottom = np.int32(-1), np.int32(0)
    for j in range(nnz):  # branch-free body: vectorizes
        page = kv_indices[j]
        indices[j] = page
        top = max(top, page)
        bottom = min(bottom, page)
    if bottom < 0 or top >= num_pages:
        for j in range(nnz):
            if kv_indices[j] < 0 or kv_indices[j] >= num_pages:
                result[R_ERROR], result[R_INDEX], result[R_VALUE] = E_PAGE_INDEX, j, kv_indices[j]
                return False
    result[R_MAX_PAGE] = top
    return True


@njit(cache=True, nogil=True)
def validate_block_lengths(seq_lens, row_stride, max_blocks, span, page_size, max_page_refs, buf, off, result):
    """Check per-request KV lengths against a block table [rows, max_blocks] (row r's page ids at
    r * row_stride of a flat view of ``span`` ids) and write kv_len and each request's first page-id
    index (r * row_stride) into ``buf``. False on an error.

    The loop has no branch and no 64-bit integer division (a shift for a power-of-two page size,
    else a float division, exact below 2**52 tokens); a bad request is looked for again after it."""
    batch = seq_lens.shape[0]
    kv_len = buf[off[S_KV_LEN] : off[S_KV_LEN] + batch]
    base = buf[off[S_KV_INDPTR] : off[S_KV_INDPTR] + batch + 1]
    shift = np.int64(0)
    while (np.int64(1) << shift) < page_size:
        shift += 1
    power_of_two = (np.int64(1) << shift) == page_size
    refs = np.int64(0)
    bad = False
    for i in range(batch):
        tokens = np.int64(seq_lens[i])
        pages = (tokens + page_size - 1) >> shift if power_of_two else np.int64((tokens + page_size - 1) / page_size)
        first = np.int64(i) * row_stride
        bad |= (tokens < 0) | (pages > max_blocks) | ((pages > 0) & (first + pages > span))
        refs += pages
        kv_len[i] = tokens
        base[i] = first if pages > 0 else 0
    if bad:
        return _block_length_error(seq_lens, row_stride, max_blocks, span, page_size, result)
    if refs > max_page_refs:
        result[R_ERROR], result[R_VALUE] = E_PAGE_REFS, refs
        return False
    base[batch] = 0
    return True


@njit(cache=True, nogil=True)
def _block_length_error(seq_lens, row_stride, max_blocks, span, page_size, result):
    """The first request of a block table whose length is wrong, into ``result``; returns False."""
    for i in range(seq_lens.shape[0]):
        tokens = np.int64(seq_lens[i])
        if tokens < 0:
            result[R_ERROR], result[R_INDEX], result[R_VALUE] = E_SEQ_LEN, i, tokens
            return False
        pages = (tokens + page_size - 1) // page_size
        if pages > max_blocks:
            result[R_ERROR], result[R_INDEX], result[R_VALUE] = E_BLOCKS, i, pages
            return False
        if pages > 0 and np.int64(i) * row_stride + pages > span:
            result[R_ERROR], result[R_INDEX], result[R_VALUE] = E_BLOCK_SPAN, i, pages
            return False
    return False


def raise_plan_error(result: np.ndarray, layout: DecodeLayout, num_pages: int, batch: int) -> None:
    code, index, value = int(result[R_ERROR]), int(result[R_INDEX]), int(result[R_VALUE])
    if code == E_INDPTR_START:
        raise InputError(f"kv_indptr[0] must be 0, got {value}")
    if code == E_INDPTR_DECREASING:
        raise InputError(f"kv_indptr must be non-decreasing, but kv_indptr[{index + 1}] < kv_indptr[{index}]")
    if code == E_INDPTR_END:
        raise InputError(f"kv_indptr[-1]={value} exceeds len(kv_indices)")
    if code == E_PAGE_REFS:
        raise PlanError(f"kv_indptr[-1]={value} page references exceed max_page_refs={layout.max_page_refs} (Settings)")
    if code == E_LAST_PAGE_LEN:
        raise InputError(f"kv_last_page_len[{index}]={value} is outside [1, page_size={layout.page_size}] for a non-empty request")
    if code == E_PAGE_INDEX:
        raise InputError(f"kv_indices[{index}]={value} is outside [0, num_pages={num_pages})")
    if code == E_SEQ_LEN:
        raise InputError(f"seq_lens[{index}]={value} must be >= 0")
    if code == E_BLOCKS:
        raise PlanError(f"request {index} needs {value} pages, more than block_table has columns")
    if code == E_BLOCK_SPAN:
        raise InputError(f"block_table row {index} (its {value} pages) lies outside block_table: it has fewer rows than seq_lens")
    if code == E_KV_LEN:
        raise PlanError(f"request {index} has kv_len {value} > {INT32_MAX} (int32 token positions)")
    raise PlanError(f"internal: the schedule of {batch} requests exceeds the plan capacities (a planner bug)")
