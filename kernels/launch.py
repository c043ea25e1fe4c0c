"""The one place kernels are launched: argument conversion, stream, simulator set-up, capture hook.

* Tensors reach kernels as flat int32 **word views** (``as_words``) or fp32 tensors, never bf16
  (numba cannot type it) -- the kernels widen at load and narrow at store.
* GPU: launches go to torch's *current* stream, fetched at every launch (graph capture swaps in a
  side stream; a cached stream object would record an empty graph).
* Simulator: CPU tensors are wrapped without a copy, so kernels write straight into them, and the
  launch runs with a fast GIL switch interval.
* A launch interceptor (set by the graph stand-in while capturing) receives the launch instead.
* Dynamic shared memory (``shared_bytes``): on a GPU the compiled kernel about to launch is opted
  into that many bytes first (``opt_in_shared_memory``; past 48 KB a CTA the driver refuses the
  launch otherwise, and numba-cuda has no option for it).

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
            configured = self.kernel[self.grid, self.block, stream, self.shared_bytes]
            if self.shared_bytes:
                nbytes = self.shared_bytes
                configured.pre_launch_callbacks.append(lambda compiled, _config: opt_in_shared_memory(compiled, nbytes))
            configured(*self.args)


#: id of a compiled kernel (numba's per-signature _Kernel, cached for the process) -> the dynamic
#: shared bytes it was opted into
_OPTED_IN: dict[int, int] = {}


def opt_in_shared_memory(compiled: Any, nbytes: int, set_attribute: Callable[..., Any] | None = None) -> None:
    """Let ``compiled`` (the kernel numba is about to launch: its per-signature object, whose
    ``library.get_cufunc()`` is the driver function) launch with ``nbytes`` of dynamic shared memory:
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, set once per kernel and size, the way numba-cuda
    sets its own carveout attribute (a function attribute: no launch, no stream work, allowed while a
    graph is captured). ``set_attribute``: the driver's cuKernelSetAttribute(attribute, value,
    handle, device id) (None: numba-cuda's). GPU only."""
    if _OPTED_IN.get(id(compiled), -1) >= nbytes:
        return
    from cuda.bindings import driver as binding

    if set_attribute is None:
        from numba.cuda.cudadrv.driver import driver

        set_attribute = driver.cuKernelSetAttribute
    cufunc = compiled.library.get_cufunc()
    attribute = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    set_attribute(attribute, int(nbytes), cufunc.handle, cufunc.device.id)
    _OPTED_IN[id(compiled)] = nbytes


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
    inside the NVTX/profiling range named ``name``, with ``shared_bytes`` of dynamic shared memory."""
    with launch_range(name):
        record = KernelLaunch(name, kernel, grid, block, shared_bytes, tuple(_device_arg(a) for a in args))
        if _interceptor is not None:
            _interceptor(record)
        else:
            record.run()
