"""tilegraph: a CUDA-Graph-aware paged attention runtime for LLM serving.

Importing tilegraph decides where kernels run: on a CUDA GPU when there is one, else on the numba
CUDA simulator with CPU tensors (``device="cpu"``; for testing, not speed). See ``tilegraph._device``.

Every log-sum-exp (LSE) tilegraph takes or returns is a **natural log** (FlashInfer's is base 2).
"""

from __future__ import annotations

from . import _device  # noqa: F401  (first: decides simulator vs GPU before numba.cuda loads)
from . import _moved
from ._device import SIMULATOR
from .errors import DeviceError, InputError, PageTableError, PageTableMovedError, PlanError, StateError, TilegraphError
from .settings import GraphSettings, Settings

_moved.install()  # old import paths of moved modules (tilegraph.bench, tilegraph.demo, ...) for one release

# The attention objects, planner and graph runtime load on first use (PEP 562): `import tilegraph`
# stays light, and the simulator decision above still comes first.
_LAZY = {
    "BatchDecode": "tilegraph.decode",
    "workspace_nbytes": "tilegraph.decode",
    "BatchPrefill": "tilegraph.prefill",
    "BatchPrefillRagged": "tilegraph.prefill",
    "Plan": "tilegraph.planner.plan",
    "GraphAware": "tilegraph.graphs.protocol",
    "PlanState": "tilegraph.graphs.protocol",
    "GraphRunner": "tilegraph.graphs.runner",
    "SimulatedGraph": "tilegraph.graphs.standin",
    "merge_state": "tilegraph.merge",
    "merge_state_in_place": "tilegraph.merge",
    "merge_states": "tilegraph.merge",
    "Variant": "tilegraph.variants",
    "VariantError": "tilegraph.variants",
    "Param": "tilegraph.variants",
    "CascadeAttention": "tilegraph.cascade",
    "LevelTable": "tilegraph.cascade",
    "append_kv": "tilegraph.append",
    "append_kv_slots": "tilegraph.append",
    "PagePool": "tilegraph.page_pool",
    "PageTable": "tilegraph.page_pool",
    "AppendIndices": "tilegraph.page_pool",
    "PoolExhaustedError": "tilegraph.page_pool",
    "UnknownRequestError": "tilegraph.page_pool",
    "profile": "tilegraph.profiling",
}


def __getattr__(name: str):
    import importlib

    module = _LAZY.get(name)
    if module is None:  # a submodule not imported yet, e.g. tilegraph.variants
        try:
            return importlib.import_module(f"tilegraph.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module 'tilegraph' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "SIMULATOR",
    "Settings",
    "GraphSettings",
    "BatchDecode",
    "BatchPrefill",
    "BatchPrefillRagged",
    "Plan",
    "workspace_nbytes",
    "GraphRunner",
    "GraphAware",
    "PlanState",
    "SimulatedGraph",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "Variant",
    "VariantError",
    "Param",
    "CascadeAttention",
    "LevelTable",
    "append_kv",
    "append_kv_slots",
    "PagePool",
    "PageTable",
    "AppendIndices",
    "PoolExhaustedError",
    "UnknownRequestError",
    "profile",
    "TilegraphError",
    "InputError",
    "PageTableError",
    "PageTableMovedError",
    "PlanError",
    "StateError",
    "DeviceError",
]
