"""The exceptions tilegraph raises. Every message names the argument or field and the bound it broke.

    TilegraphError            base of everything below
    ├── InputError            bad tensors or page tables        (also a ValueError)
    │   └── PageTableError    a device page table held an id outside the pool (debug check)
    ├── PlanError             a batch beyond the Settings bounds (also a ValueError)
    ├── StateError            a call in the wrong order          (also a RuntimeError)
    │   └── PageTableMovedError  a graph replay with another page-table tensor than at capture
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


class PageTableError(InputError):
    """A page id read on the device (a device page table or block table) lay outside [0, num_pages):
    the kernels read nothing for it and flagged the request; ``request`` names it."""

    def __init__(self, message: str, request: int) -> None:
        super().__init__(message)
        self.request = request


class PageTableMovedError(StateError):
    """A CUDA-graph replay whose plan reads page ids from another tensor (address) than the one the
    graph was captured with: the captured kernels would read the old one."""


class DeviceError(TilegraphError, RuntimeError):
    """The requested device cannot run kernels in this process (and the message says what to do)."""
