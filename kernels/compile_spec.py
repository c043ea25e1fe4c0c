"""What the driverless GPU compile check compiles: each kernel module lists its specializations.

A kernel module exposes ``gpu_compile_specs() -> list[CompileSpec]`` covering every value of each
specialization axis (dtype, head_dim, layout, variant ...) at least once -- not the full product.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class CompileSpec:
    name: str                        # e.g. "decode[float16,hd128,NHD]"
    pyfunc: Callable[..., Any]       # the plain Python kernel function (before cuda.jit)
    signature: str                   # numba signature, e.g. "void(int32[::1], float32[::1], int32)"
    expect: tuple[str, ...] = field(default=())  # PTX substrings that must appear (e.g. "ld.global.nc.v4")
    fastmath: bool = False           # the kernel's own cuda.jit fastmath option
