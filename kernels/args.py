"""Kernel launch arguments named once: an ordered (name, numba type) table per kernel.

    DECODE_ARGS = KernelArgs("decode", (("header", I32), ..., ("sm_scale", "float32")))
    DECODE_ARGS.signature                 # "void(int32[::1], ..., float32)" for compile_ptx
    DECODE_ARGS.check(pyfunc)             # the kernel's own parameters must be the table's names
    DECODE_ARGS.values(header=..., ...)   # the launch tuple, in order; a missing or extra name raises

The table is the single source of the order: the signature string and the launch tuple are both
made from it, and ``check`` ties the Python kernel definition to it when the kernel is built.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

I32 = "int32[::1]"
F32 = "float32[::1]"
U8 = "uint8[::1]"


#: the arguments decode and prefill kernels share after their q strides: K/V views and strides,
#: outputs, split partials, scale, heads, variant params (AttentionBase.shared_launch_values fills them)
ATTENTION_KV_OUT_ARGS: tuple[tuple[str, str], ...] = (
    ("k_words", I32), ("v_words", I32), ("page_stride", "int64"), ("token_stride", "int64"),
    ("head_stride", "int64"), ("page_size", "int64"),
    ("out_words", I32), ("lse", F32), ("write_lse", "int32"), ("partial_out", F32), ("partial_lse", F32),
    ("sm_scale", "float32"), ("num_qo_heads", "int64"), ("params", F32),
)  # fmt: skip


class KernelArgumentError(TypeError):
    """A launch named an argument the kernel does not have, or left one out (a library bug)."""


@dataclass(frozen=True)
class KernelArgs:
    kernel: str
    entries: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        names = self.names
        if len(set(names)) != len(names):
            raise KernelArgumentError(f"{self.kernel}: duplicate argument names in {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.entries)

    @property
    def signature(self) -> str:
        return "void(" + ", ".join(numba_type for _, numba_type in self.entries) + ")"

    def check(self, pyfunc: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``pyfunc`` after checking its parameter names are exactly the table's, in order."""
        params = tuple(inspect.signature(pyfunc).parameters)
        if params != self.names:
            raise KernelArgumentError(f"{self.kernel}: kernel parameters {params} differ from its argument table {self.names}")
        return pyfunc

    def values(self, **named: Any) -> tuple[Any, ...]:
        """The launch tuple for ``named`` values, in table order; refuses a missing or extra name."""
        missing = [n for n in self.names if n not in named]
        extra = sorted(set(named) - set(self.names))
        if missing or extra:
            raise KernelArgumentError(f"{self.kernel} launch: missing arguments {missing}, unknown arguments {extra}")
        return tuple(named[n] for n in self.names)
