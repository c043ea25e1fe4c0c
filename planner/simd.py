"""One LLVM vector store for the njit planner cores: four int32 words written as one 16-byte store.

LLVM leaves the planner's short store loops scalar (runtime trip counts), and scalar stores were
what a plan's emitting pass waited on: four words a store took the B=256 log-normal pass from 9.5
to 8.5 us on the 2-core VM (32-byte stores, which cross a cache line twice as often, gained less).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic


@intrinsic
def store_int32x4(typingctx, array, index, first, step):
    """``array[index + j] = first + j * step`` for j in 0..3 (int32, wrapping), as one unaligned
    16-byte store: ``array`` a C-contiguous 1-D int32 array, ``index + 3`` within it (unchecked)."""
    if not (isinstance(array, types.Array) and array.dtype == types.int32 and array.ndim == 1 and array.layout == "C"):
        return None
    if not all(isinstance(value, types.Integer) for value in (index, first, step)):
        return None
    signature = types.void(array, index, first, step)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        word = ir.IntType(32)
        lanes = ir.VectorType(word, 4)
        start = builder.gep(data, [args[1]])
        base, stride = _as_word(builder, args[2], word), _as_word(builder, args[3], word)
        vector = ir.Constant(lanes, ir.Undefined)
        for lane in range(4):
            value = builder.add(base, builder.mul(stride, ir.Constant(word, lane)))
            vector = builder.insert_element(vector, value, ir.Constant(word, lane))
        store = builder.store(vector, builder.bitcast(start, lanes.as_pointer()))
        store.align = 4
        return context.get_dummy_value()

    return signature, codegen


def _as_word(builder, value, word):  # noqa: ANN001, ANN202 -- llvmlite values
    """An LLVM integer value as ``word`` (int32): truncated from wider, sign-extended from narrower."""
    if value.type.width > word.width:
        return builder.trunc(value, word)
    if value.type.width < word.width:
        return builder.sext(value, word)
    return value
