"""Deferred-completion emulation of ``cp.async`` for the numba CUDA simulator.

Each simulated thread keeps its own queue: ``copy`` reads the 16 source bytes at issue time (the
source is global memory that the kernel does not write) and at once overwrites the destination
with ``PENDING`` (a NaN pattern for f32, f16 and bf16 alike: on a GPU the bytes may change any time
after the issue); the copy sits in the thread's open group until ``commit`` closes it, and a
committed group lands only at a ``wait(n)`` that leaves at most ``n`` newer committed groups
pending. Both extremes a GPU allows are thus taken: a kernel that reads its shared tile before the
wait that covers it reads PENDING every time, and one that issues into a buffer other threads are
still reading (a missing barrier before the issue) hands them PENDING.

Copies never committed, or committed and never waited for, are dropped when the thread ends (on
a GPU they would land at some unknown time; a correct kernel never reads them).

State lives on the simulator's per-thread object (``threading.current_thread()``), which is new
for every simulated thread of every launch.
"""

from __future__ import annotations

import threading

import numpy as np

_ATTR = "_tilegraph_cp_async"
#: what a destination word holds between issue and landing (NaN as f32, and as each f16/bf16 half)
PENDING = np.int32(0x7FC07FC0)


class _Queue:
    __slots__ = ("open", "committed")

    def __init__(self) -> None:
        self.open: list[tuple[object, int, np.ndarray]] = []
        self.committed: list[list[tuple[object, int, np.ndarray]]] = []


def _queue() -> _Queue:
    thread = threading.current_thread()
    if not hasattr(thread, "_manager"):
        raise RuntimeError("cp.async can only be called inside a simulated kernel")
    q = thread.__dict__.get(_ATTR)
    if q is None:
        q = thread.__dict__[_ATTR] = _Queue()
    return q


def copy(dst, dst_index, src, src_index, valid) -> None:
    """Queue a 16-byte (4-word) copy src[src_index:+4] -> dst[dst_index:+4]; zeros when not ``valid``."""
    di = int(dst_index)
    if di % 4:
        raise IndexError(f"cp_async_16: shared word index {di} is not 16-byte aligned")
    if di < 0 or di + 4 > dst.shape[0]:
        raise IndexError(f"cp_async_16: shared words [{di}, {di + 4}) outside the array of {dst.shape[0]}")
    if valid:
        si = int(src_index)
        if si % 4:
            raise IndexError(f"cp_async_16: global word index {si} is not 16-byte aligned")
        if si < 0 or si + 4 > src.shape[0]:
            raise IndexError(f"cp_async_16: global words [{si}, {si + 4}) outside the array of {src.shape[0]}")
        data = np.array([src[si], src[si + 1], src[si + 2], src[si + 3]], dtype=dst.dtype)
    else:
        data = np.zeros(4, dtype=dst.dtype)
    q = _queue()
    for k in range(4):
        dst[di + k] = PENDING
    q.open.append((dst, di, data))


def commit() -> None:
    """Close the open group (possibly empty) and append it to the committed groups."""
    q = _queue()
    q.committed.append(q.open)
    q.open = []


def wait(pending: int) -> None:
    """Land every committed group but the newest ``pending`` ones (oldest first)."""
    q = _queue()
    while len(q.committed) > pending:
        for dst, di, data in q.committed.pop(0):
            for k in range(4):
                dst[di + k] = data[k]


def pending_groups() -> int:
    """Committed groups of the calling thread not yet landed (for tests)."""
    return len(_queue().committed)
