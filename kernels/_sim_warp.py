"""Exact warp collectives for the numba CUDA simulator.

Every simulated lane is a Python thread, so a collective is a rendezvous: each lane of the warp
writes its value into a slot, waits at the warp's barrier, and reads any slot. Slots are double
buffered by a per-lane call counter, so one barrier per collective suffices: a lane can only
rewrite a buffer after every lane has passed the next collective's barrier, i.e. finished reading.

This reads the simulator's per-thread state (``threading.current_thread()`` is a ``BlockThread``
carrying ``_manager``, ``blockIdx`` and ``thread_id``): private API, hence the numba-cuda pin.
"""

from __future__ import annotations

import threading

LANE_TIMEOUT_S = 120.0
_registry_lock = threading.Lock()


class _Warp:
    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        self.barrier = threading.Barrier(lanes, timeout=LANE_TIMEOUT_S)
        self.slots = ([None] * lanes, [None] * lanes)


def _warp_of(thread) -> tuple[_Warp, int]:
    manager = thread._manager
    bx, by, bz = manager._block_dim
    num_threads = bx * by * bz
    warp_index, lane = divmod(thread.thread_id, 32)
    key = (thread.blockIdx.x, thread.blockIdx.y, thread.blockIdx.z, warp_index)
    with _registry_lock:
        warps = manager.__dict__.setdefault("_tilegraph_warps", {})
        warp = warps.get(key)
        if warp is None:
            warp = warps[key] = _Warp(min(32, num_threads - 32 * warp_index))
    return warp, lane


def exchange(mask: int, value):
    """Publish ``value`` for this lane; return (lane, every lane's value, lanes in the warp)."""
    thread = threading.current_thread()
    if not hasattr(thread, "_manager"):
        raise RuntimeError("warp collectives can only be called inside a simulated kernel")
    warp, lane = _warp_of(thread)
    present = (1 << warp.lanes) - 1
    if (int(mask) & present) != present:
        raise NotImplementedError(
            f"simulated warp collective with mask {int(mask):#x}: only masks covering all {warp.lanes} "
            "lanes of the warp are emulated"
        )
    count = thread.__dict__.get("_tilegraph_collectives", 0)
    thread._tilegraph_collectives = count + 1
    slots = warp.slots[count & 1]
    slots[lane] = value
    try:
        warp.barrier.wait()
    except threading.BrokenBarrierError:
        raise RuntimeError(
            f"warp collective in block {tuple(thread.blockIdx)}: not every lane of warp "
            f"{thread.thread_id // 32} arrived within {LANE_TIMEOUT_S:.0f} s (divergent collective "
            "or an exited lane; undefined behaviour on a GPU)"
        ) from None
    return lane, slots, warp.lanes
