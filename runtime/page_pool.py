"""``tilegraph.PagePool``: host-side allocator of the KV cache's pages, and the page tables it implies.

    pool = tilegraph.PagePool(settings)                       # settings.max_num_pages pages
    step = pool.allocate_step([7, 3], [5, 1])                 # request 7 gets 5 tokens, 3 one more
    kv_indptr, kv_indices, kv_last_page_len = pool.page_table([7, 3])
    # upload: append_kv(k, v, cache, step.batch_indices, step.positions, kv_indptr, kv_indices, ...)
    pool.free(7)                                              # its pages return to the pool

Requests are identified by any hashable id. A request owns its pages in order; its token at
position p lives in page ``pages[p // page_size]``, slot ``p % page_size``. No page is ever held by
two live requests. Every operation either succeeds completely or raises before changing anything.
Freed pages are reused first (last freed, first handed out). Bookkeeping is O(pages touched).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

from tilegraph.errors import InputError, PlanError, StateError

from .settings import Settings


class PoolExhaustedError(PlanError):
    """The pool has fewer free pages than an allocation needs (nothing was allocated)."""


class UnknownRequestError(StateError):
    """A request id that the pool does not hold: never allocated, or already freed."""


class PageTable(NamedTuple):
    """CSR page table for a batch, int32 numpy arrays (FlashInfer's format)."""

    kv_indptr: np.ndarray  # [B+1]
    kv_indices: np.ndarray  # [sum of pages]
    kv_last_page_len: np.ndarray  # [B]; 1..page_size, or 0 for a request with no tokens


class AppendIndices(NamedTuple):
    """Where a step's new tokens go, as ``append_kv`` takes them: int32 numpy arrays [nnz]."""

    batch_indices: np.ndarray  # index of the token's request in the step's batch; -1 for padding
    positions: np.ndarray  # the token's position in its request's KV; 0 for padding


class PagePool:
    """Allocates the ``settings.max_num_pages`` pages of ``settings.page_size`` tokens to requests."""

    def __init__(self, settings: Settings) -> None:
        if not isinstance(settings, Settings):
            raise InputError(f"settings must be a tilegraph.Settings, got {type(settings).__name__}")
        self.page_size = settings.page_size
        self.max_num_pages = settings.max_num_pages
        self._free: list[int] = list(range(self.max_num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._pages: dict[Hashable, list[int]] = {}
        self._kv_len: dict[Hashable, int] = {}

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def request_ids(self) -> list[Hashable]:
        """The live requests, in allocation order."""
        return list(self._pages)

    def __contains__(self, request_id: Hashable) -> bool:
        return _hashable(request_id) in self._pages

    def kv_len(self, request_id: Hashable) -> int:
        """Tokens the request holds."""
        self._require(request_id)
        return self._kv_len[request_id]

    def pages(self, request_id: Hashable) -> list[int]:
        """The request's pages in order (a copy)."""
        self._require(request_id)
        return list(self._pages[request_id])

    def pages_needed(self, request_id: Hashable, num_tokens: int) -> int:
        """New pages that growing the request (a new one if unknown) by num_tokens would take."""
        held = len(self._pages.get(_hashable(request_id), ()))
        total = self._kv_len.get(request_id, 0) + _count("num_tokens", num_tokens)
        return -(-total // self.page_size) - held

    # ---- changes -------------------------------------------------------------------------------

    def allocate(self, request_id: Hashable, num_tokens: int) -> np.ndarray:
        """Grow the request (created if unknown) by num_tokens; returns their positions (int32).

        Raises PoolExhaustedError, with nothing allocated, when the free pages do not suffice."""
        needed = self.pages_needed(request_id, num_tokens)
        if needed > len(self._free):
            raise PoolExhaustedError(
                f"request {request_id!r} needs {needed} more pages for {num_tokens} tokens but only "
                f"{len(self._free)} of max_num_pages={self.max_num_pages} are free"
            )
        return self._grow(request_id, num_tokens, needed)

    def allocate_step(
        self,
        request_ids: Sequence[Hashable],
        num_tokens: int | Sequence[int] = 1,
        pad_to: int | None = None,
    ) -> AppendIndices:
        """Grow every request of a step's batch (all or nothing) and say where the new tokens go.

        num_tokens: one count for all, or one per request (a prompt for a new request, 1 for a
        decoding one). Row order: request 0's tokens, then request 1's ... ; ``pad_to`` appends
        padding rows (batch index -1) up to that many rows (a CUDA-graph bucket)."""
        ids = _distinct(request_ids)
        if isinstance(num_tokens, (int, np.integer)):
            counts = [num_tokens] * len(ids)
        elif isinstance(num_tokens, (list, tuple, np.ndarray)):
            counts = list(num_tokens)
        else:
            raise InputError(f"num_tokens must be an integer or a sequence of them, got {type(num_tokens).__name__}")
        if len(counts) != len(ids):
            raise InputError(f"num_tokens has {len(counts)} entries for {len(ids)} request ids")
        counts = [_count("num_tokens", n) for n in counts]
        if pad_to is not None:
            pad_to = _count("pad_to", pad_to)
        needed = [self.pages_needed(rid, n) for rid, n in zip(ids, counts)]
        nnz = sum(counts)
        if pad_to is not None and pad_to < nnz:
            raise InputError(f"pad_to={pad_to} is smaller than the step's {nnz} new tokens")
        if sum(needed) > len(self._free):
            raise PoolExhaustedError(
                f"the step needs {sum(needed)} more pages for {nnz} tokens of {len(ids)} requests but only "
                f"{len(self._free)} of max_num_pages={self.max_num_pages} are free"
            )
        rows = nnz if pad_to is None else pad_to
        batch_indices = np.full(rows, -1, dtype=np.int32)
        positions = np.zeros(rows, dtype=np.int32)
        row = 0
        for index, (rid, n, pages) in enumerate(zip(ids, counts, needed)):
            positions[row : row + n] = self._grow(rid, n, pages)
            batch_indices[row : row + n] = index
            row += n
        return AppendIndices(batch_indices, positions)

    def free(self, request_id: Hashable) -> None:
        """Return the request's pages to the pool; the id becomes unknown (freeing again raises)."""
        self._require(request_id)
        self._free.extend(reversed(self._pages.pop(request_id)))
        del self._kv_len[request_id]

    # ---- page tables ---------------------------------------------------------------------------

    def page_table(self, request_ids: Sequence[Hashable]) -> PageTable:
        """CSR page table of the batch ``request_ids`` (distinct, live), for the planner and append_kv."""
        ids = _distinct(request_ids)
        for rid in ids:
            self._require(rid)
        counts = [len(self._pages[rid]) for rid in ids]
        kv_indptr = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(counts, out=kv_indptr[1:])
        kv_indices = np.fromiter(
            (page for rid in ids for page in self._pages[rid]), dtype=np.int32, count=int(kv_indptr[-1])
        )
        lengths = np.array([self._kv_len[rid] for rid in ids], dtype=np.int64)
        last = np.where(lengths > 0, (lengths - 1) % self.page_size + 1, 0).astype(np.int32)
        return PageTable(kv_indptr, kv_indices, last)

    # ---- internals -----------------------------------------------------------------------------

    def _grow(self, request_id: Hashable, num_tokens: int, new_pages: int) -> np.ndarray:
        start = self._kv_len.get(request_id, 0)
        pages = self._pages.setdefault(request_id, [])
        for _ in range(new_pages):
            pages.append(self._free.pop())
        self._kv_len[request_id] = start + num_tokens
        return np.arange(start, start + num_tokens, dtype=np.int32)

    def _require(self, request_id: Hashable) -> None:
        if _hashable(request_id) not in self._pages:
            raise UnknownRequestError(f"request {request_id!r} is not in the pool (never allocated, or already freed)")


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _hashable(request_id: object) -> Hashable:
    try:
        hash(request_id)
    except TypeError:
        raise InputError(f"request id {request_id!r} is not hashable (use an int, str or tuple)") from None
    return request_id


def _distinct(request_ids: Sequence[Hashable]) -> list[Hashable]:
    if isinstance(request_ids, (str, bytes)) or not isinstance(request_ids, (Sequence, np.ndarray)):
        raise InputError(f"request_ids must be a sequence (list or tuple) of request ids, got {type(request_ids).__name__}")
    ids = [rid.item() if isinstance(rid, np.generic) else rid for rid in request_ids]
    seen: set[Hashable] = set()
    for rid in ids:
        if _hashable(rid) in seen:
            raise InputError(f"request id {rid!r} appears twice in one batch")
        seen.add(rid)
    return ids
