"""The page-id guard: every kernel that reads a page id from a page table calls ``guarded_page``.

A page table that lives on the device (``BatchDecode.plan(..., page_table="device")``, a block
table) is never read by the host, so its ids are checked where the kernels load them: an id
outside ``[0, header[H_NUM_PAGES])`` reads nothing (the caller masks the token out of the softmax) and
records ``1 + request`` in ``header[H_PAGE_ERROR]`` (an atomic max: some offending request wins).
The runtime reads that word after a step in debug mode (``Settings.debug_page_table``) and raises
``PageTableError`` naming the request. Host page tables are validated by the planner as before;
the guard then never fires.
"""

from __future__ import annotations

from numba import int32, int64, uint32

from tilegraph._device import cuda
from tilegraph.planner.layout import H_NUM_PAGES, H_PAGE_ERROR


@cuda.jit(device=True, inline="always")
def guarded_page(kv_indices, index, bound, header, request):
    """``kv_indices[index]`` as int64 when it lies in [0, bound) (``bound``: header[H_NUM_PAGES]);
    else -1,
    and header[H_PAGE_ERROR] becomes at least 1 + request (the caller must then read nothing)."""
    page = int32(kv_indices[index])
    if uint32(page) >= uint32(bound):  # one unsigned compare: negative ids wrap above any bound
        cuda.atomic.max(header, H_PAGE_ERROR, int32(request + 1))
        return int64(-1)
    return int64(page)
