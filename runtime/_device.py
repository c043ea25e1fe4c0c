"""Where kernels run: a CUDA GPU when there is one, else the numba CUDA simulator on CPU tensors.

This module is imported first by ``import tilegraph``: with no GPU, and numba's CUDA target not yet
imported, it turns the simulator on (``NUMBA_ENABLE_CUDASIM=1``) so the very same kernel sources run
on CPU tensors. The simulator is for testing, not speed: one Python thread per CUDA thread.

``TILEGRAPH_SIMULATOR=1`` forces the simulator even on a GPU machine; ``=0`` forbids it.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Literal

import torch

from .errors import DeviceError

DeviceName = Literal["cuda", "cpu"]


def _decide_simulator() -> bool:
    forced = os.environ.get("TILEGRAPH_SIMULATOR")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") not in (None, ""):
        return os.environ["NUMBA_ENABLE_CUDASIM"] == "1"
    if "numba.cuda" in sys.modules:
        return False  # too late to switch: numba's CUDA target is already real
    if forced is not None:
        want = forced == "1"
    else:
        want = not torch.cuda.is_available()
    if want:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    return want


SIMULATOR: bool = _decide_simulator()

from numba import cuda  # noqa: E402  (after the simulator decision, on purpose)
from numba.cuda.core import config as _cuda_config  # noqa: E402

# What numba actually did (the env may have been read by an earlier import).
SIMULATOR = bool(_cuda_config.ENABLE_CUDASIM)
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")


def _install_simulator_fixes() -> None:
    """Lock the simulator's shared-array get-or-create. Unlocked, threads of one block that reach the
    same ``cuda.shared.array`` line together can get different buffers (a silent wrong answer)."""
    import traceback

    import numpy as np
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    shared_cls = kernelapi.FakeCUDAShared
    if getattr(shared_cls, "_tilegraph_locked", False):
        return
    unlocked_array = shared_cls.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:  # errors and dynamic shared memory: unchanged
            return unlocked_array(self, shape, dtype, alignment)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]  # keyed by the calling line
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                np_dtype = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                res = self._allocations[caller] = np.empty(shape, np_dtype)
            return res

    shared_cls.array = array
    shared_cls._tilegraph_locked = True


if SIMULATOR:
    _install_simulator_fixes()


#: Simulated launches run one at a time in the process. The simulator swaps every module global that
#: is ``numba.cuda`` for its fake while a launch runs and restores it afterwards: two launches from
#: two threads at once would see each other's swap (``'Thread' object has no attribute 'threadIdx'``).
SIMULATOR_LAUNCH_LOCK = threading.RLock()


@contextmanager
def simulating() -> Iterator[None]:
    """Around a simulated launch: holds SIMULATOR_LAUNCH_LOCK (launches from several Python threads
    are serialized) and a fast GIL switch rate (threads meet at barriers far sooner)."""
    with SIMULATOR_LAUNCH_LOCK:
        previous = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            yield
        finally:
            sys.setswitchinterval(previous)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Check that kernels can run on ``device`` in this process and return it as a torch.device."""
    if device is None:
        device = "cpu" if SIMULATOR else "cuda"
    if not isinstance(device, (str, torch.device)):
        raise DeviceError(f"device must be 'cuda', 'cpu', a torch.device or None, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device={device!r} is not a device: use 'cuda' (a GPU) or 'cpu' (the simulator)") from None
    if dev.type == "cuda":
        if SIMULATOR:
            raise DeviceError(
                "device='cuda' was requested but tilegraph runs kernels on the numba CUDA simulator in "
                "this process (no GPU was found when tilegraph was imported, or NUMBA_ENABLE_CUDASIM=1 / "
                "TILEGRAPH_SIMULATOR=1 is set); use device='cpu'"
            )
        if not torch.cuda.is_available():
            raise DeviceError("device='cuda' was requested but torch sees no CUDA device")
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cpu":
        if not SIMULATOR:
            raise DeviceError(
                "device='cpu' needs the numba CUDA simulator, but numba's CUDA target was imported "
                "without it before tilegraph. Import tilegraph before numba.cuda (it enables the simulator "
                "itself when there is no GPU), or set NUMBA_ENABLE_CUDASIM=1 (or TILEGRAPH_SIMULATOR=1) in "
                "the environment before starting Python"
            )
        return dev
    raise DeviceError(f"device={str(dev)!r} is not supported: use 'cuda' (a GPU) or 'cpu' (the simulator)")


def default_num_ctas(device: torch.device, ctas_per_sm: int = 2) -> int:
    """The persistent-CTA budget when Settings leave ``num_ctas=None``: SMs x resident CTAs on a GPU;
    a small grid on the simulator (every simulated CTA costs seconds)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return int(sms * ctas_per_sm)
    return 4


__all__ = ["SIMULATOR", "SIMULATOR_LAUNCH_LOCK", "cuda", "simulating", "resolve_device", "default_num_ctas", "DeviceName"]
