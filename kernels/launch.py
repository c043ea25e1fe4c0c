"""The one place kernels are launched: argument conversion, stream, simulator set-up, capture hook.

* Tensors reach kernels as flat int32 **word views** (``as_words``) or fp32 tensors, never bf16
  (numba cannot type it) -- the kernels widen at load and narrow at store.
* GPU: launches go to torch's *current* stream, fetched at every launch (graph capture swaps in a
  side stream; a cached stream object would record an empty graph).
* Simulator: CPU tensors are wrapped without a copy, so kernels write straight into them, and the
  launch runs with a fast GIL switch interval.
* A launch interceptor (set by the graph stand-in while capturing) receives the launch instead.

Threads. Simulator: launches from several Python threads are serialized by
``tilegraph._device.SIMULATOR_LAUNCH_LOCK`` (the simulator swaps module globals while a launch
runs). GPU: launches are not serialized; each goes to the calling thread's current torch stream.
The rule on both: each thread plans and runs its *own* attention objects (a plan, its staging
buffers and its fixed workspace belong to one object and are not locked); to share one object
between threads, serialize its plan()/run() pairs yourself. The graph stand-in's capture
interceptor is process-wide: capture from one thread at a time.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from tilegraph._device import SIMULATOR, cuda, simulating
from tilegraph.nvtx_ranges import launch_range

Interceptor = Callable[["KernelLaunch"], None]
_interceptor: Interceptor | None = None


class KernelLaunch:
    """One launch, arguments converted and frozen: ``run()`` executes it (again)."""

    __slots__ = ("name", "kernel", "grid", "block", "shared_bytes", "args")

    def __init__(self, name: str, kernel: Any, grid: tuple, block: tuple, shared_bytes: int, args: tuple):
        self.name, self.kernel, self.grid, self.block = name, kernel, grid, block
        self.shared_bytes, self.args = shared_bytes, args

    def run(self) -> None:
        if SIMULATOR:
            with simulating():
                self.kernel[self.grid, self.block, 0, self.shared_bytes](*self.args)
        else:
            stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
            self.kernel[self.grid, self.block, stream, self.shared_bytes](*self.args)


def set_interceptor(interceptor: Interceptor | None) -> Interceptor | None:
    """Route launches to ``interceptor`` (None: run them). Returns the previous one."""
    global _interceptor
    previous, _interceptor = _interceptor, interceptor
    return previous


def as_words(t: torch.Tensor) -> torch.Tensor:
    """Flat int32 view of a contiguous tensor whose byte size is a multiple of 4 (no copy)."""
    flat = t.reshape(-1) if t.is_contiguous() else None
    if flat is None:
        raise ValueError("as_words needs a contiguous tensor")
    return flat.view(torch.uint8).view(torch.int32) if t.element_size() != 4 else flat.view(torch.int32)


def _device_arg(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        if SIMULATOR:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

            return FakeCUDAArray(arg.detach().numpy())
        return arg.detach()
    return arg


def launch(name: str, kernel: Any, grid: tuple, block: tuple, args: Sequence[Any], shared_bytes: int = 0) -> None:
    """Launch ``kernel[grid, block]`` on the current stream (or hand it to the capture interceptor),
    inside the NVTX/profiling range named ``name``."""
    with launch_range(name):
        record = KernelLaunch(name, kernel, grid, block, shared_bytes, tuple(_device_arg(a) for a in args))
        if _interceptor is not None:
            _interceptor(record)
        else:
            record.run()
