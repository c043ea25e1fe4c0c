"""NaN in, NaN out: the device helpers and compile flags that keep a NaN visible through the kernels.

A NaN in q, k, v or a hook's result must reach the rows it touches, and nothing else. Two things
hide it unless the kernels say otherwise: the GPU's ``max.f32`` (and Python's ``max``) return the
non-NaN operand, so a running softmax max drops it; and the ``fast`` math flag lets the compiler
assume no NaN/Inf exist and fold the tests away. So the kernels take maxima through ``nan_max`` (an
explicit ``a != a`` select, ``setp.nan`` in PTX -- the compile check looks for it) and compile with
FASTMATH, every fast-math flag except no-NaN / no-Inf.

The converse is a selection, never a product: a masked or out-of-range position is skipped, not
weighted by 0 (0 * NaN is NaN), so NaN/Inf stored there never reaches an output.
"""

from __future__ import annotations

from tilegraph._device import cuda

#: LLVM fast-math flags for every attention / merge kernel: all but ``nnan`` and ``ninf``
FASTMATH = frozenset({"contract", "afn", "arcp", "nsz", "reassoc"})

#: what the compile check finds in the PTX when the NaN selects survived (``nan_max``'s a != a)
NAN_PTX = "setp.nan"
#: ... and when the maxima are primitives.max_nan (one NaN-propagating max instruction)
MAX_NAN_PTX = "max.NaN.f32"


def nan_expect(hooks: object) -> tuple[str, ...]:
    """The NaN PTX expectation of a kernel compiled with ``hooks``: softmax kernels take maxima
    (NAN_PTX); softmax-free ones only sum, which propagates NaN by itself (nothing to look for)."""
    return (NAN_PTX,) if getattr(hooks, "softmax", True) else ()


def fastmath_flags() -> set[str]:
    """FASTMATH as the mutable set numba's ``fastmath=`` takes."""
    return set(FASTMATH)


@cuda.jit(device=True, inline="always")
def is_nan(x):
    return x != x


@cuda.jit(device=True, inline="always")
def nan_max(a, b):
    """max(a, b), NaN when either is NaN."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a > b else b
