"""A CUDA-graph stand-in for the simulator: the discipline of capture/replay, testable on a CPU.

Capturing records, in order, every torch operator the forward runs (at the aten level, through a
``TorchDispatchMode``) and every tilegraph kernel launch with its arguments frozen (the launch
interceptor). Kernel launches are NOT executed while capturing, as on a GPU. ``replay()`` re-runs
exactly those records against the same tensors: an aten op is re-executed and its result copied
into the tensor it produced at capture (the "fixed address"); a kernel launch re-runs with the very
buffers and scalars it was captured with. Whatever a step reads must therefore live in those
buffers -- a kernel argument that bypassed them replays stale data, as it would on a GPU.

Allocations of uninitialized memory (``empty`` and friends) are not replayed: in a CUDA graph an
allocation is an address in the graph's pool, nothing is written there at replay. So memory a
captured kernel does not write (the padded rows of a bucket's output) keeps what it held, on the
simulator as on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tilegraph.errors import StateError
from tilegraph.kernels import launch as launch_mod


class _AtenStep:
    __slots__ = ("func", "args", "kwargs", "outputs")

    def __init__(self, func: Any, args: tuple, kwargs: dict, outputs: list[torch.Tensor]):
        self.func, self.args, self.kwargs, self.outputs = func, args, kwargs, outputs

    def run(self) -> None:
        result = self.func(*self.args, **self.kwargs)
        fresh = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        for captured, new in zip(self.outputs, fresh):
            if captured is not new and captured.data_ptr() != new.data_ptr():
                captured.copy_(new)


#: aten ops that only allocate (their contents are undefined): nothing to re-run at replay
_ALLOCATIONS = frozenset(
    getattr(torch.ops.aten, name) for name in ("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided")
)


class _Recorder(TorchDispatchMode):
    def __init__(self, steps: list) -> None:
        super().__init__()
        self.steps = steps

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func.namespace == "tilegraph":
            return result  # its kernel launches were recorded by the interceptor
        if func.overloadpacket in _ALLOCATIONS:
            return result  # an address in the pool: replay writes nothing there
        outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        self.steps.append(_AtenStep(func, args, kwargs, outputs))
        return result


class SimulatedGraph:
    """``torch.cuda.CUDAGraph``'s surface for the simulator: ``capture()`` context and ``replay()``."""

    def __init__(self) -> None:
        self.steps: list[Any] = []
        self._captured = False

    @property
    def num_kernel_launches(self) -> int:
        return sum(isinstance(s, launch_mod.KernelLaunch) for s in self.steps)

    def capture(self) -> "_Capture":
        if self._captured:
            raise StateError("this graph was already captured: capture() once per SimulatedGraph")
        return _Capture(self)

    def replay(self) -> None:
        if not self._captured:
            raise StateError("replay() before capture: capture the graph first")
        for step in self.steps:
            step.run()


class _Capture:
    def __init__(self, graph: SimulatedGraph) -> None:
        self.graph = graph
        self._mode: _Recorder | None = None
        self._previous: Any = None

    def __enter__(self) -> SimulatedGraph:
        self._previous = launch_mod.set_interceptor(self.graph.steps.append)
        self._mode = _Recorder(self.graph.steps)
        self._mode.__enter__()
        return self.graph

    def __exit__(self, *exc: Any) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)
        launch_mod.set_interceptor(self._previous)
        self.graph._captured = exc[0] is None
