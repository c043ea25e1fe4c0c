"""tilegraph: a CUDA-Graph-aware paged attention runtime for LLM serving.

Importing tilegraph decides where kernels run: on a CUDA GPU when there is one, else on the numba
CUDA simulator with CPU tensors (``device="cpu"``; for testing, not speed). See ``tilegraph._device``.

Every log-sum-exp (LSE) tilegraph takes or returns is a **natural log** (FlashInfer's is base 2).
"""

from __future__ import annotations

from . import _device  # noqa: F401  (first: decides simulator vs GPU before numba.cuda loads)
from ._device import SIMULATOR
from .errors import DeviceError, InputError, PlanError, StateError, TilegraphError
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "SIMULATOR",
    "Settings",
    "TilegraphError",
    "InputError",
    "PlanError",
    "StateError",
    "DeviceError",
]
