"""The exceptions tilegraph raises. Every message names the argument or field and the bound it broke.

    TilegraphError            base of everything below
    ├── InputError            bad tensors or page tables        (also a ValueError)
    ├── PlanError             a batch beyond the Settings bounds (also a ValueError)
    ├── StateError            a call in the wrong order          (also a RuntimeError)
    └── DeviceError           no usable device for the request   (also a RuntimeError)
"""

from __future__ import annotations


class TilegraphError(Exception):
    """Base class of every error tilegraph raises on purpose."""


class InputError(TilegraphError, ValueError):
    """A tensor or page table is malformed: dtype, device, rank, shape, alignment or content."""


class PlanError(TilegraphError, ValueError):
    """A batch exceeds a bound fixed by Settings (batch size, page references, workspace slots)."""


class StateError(TilegraphError, RuntimeError):
    """A call made in the wrong order: run before plan, replay without a fresh plan, ..."""


class DeviceError(TilegraphError, RuntimeError):
    """The requested device cannot run kernels in this process (and the message says what to do)."""
