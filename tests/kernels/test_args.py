"""Kernel launch arguments are named once: each kernel's table makes its signature and its launch
tuple, a launch naming a missing or unknown argument is refused, and every kernel template's
parameters are exactly its table's names."""

from __future__ import annotations

import re

import pytest

import tilegraph  # noqa: F401  (decides the simulator first)
from tilegraph.kernels import primitives as prim
from tilegraph.kernels.append import APPEND_ARGS, make_append_kernel
from tilegraph.kernels.args import KernelArgs, KernelArgumentError
from tilegraph.kernels.decode import DECODE_ARGS, DecodeConfig, decode_signature, make_decode_kernel
from tilegraph.kernels.merge import PARTIAL_MERGE_ARGS, PARTIAL_MERGE_SIGNATURE, make_partial_merge_kernel
from tilegraph.kernels.prefill import PREFILL_ARGS, PrefillConfig, make_prefill_kernel, prefill_signature

TABLE = KernelArgs("toy", (("a", "int32[::1]"), ("n", "int64"), ("x", "float32")))


def test_signature_and_values_follow_the_table_order():
    assert TABLE.signature == "void(int32[::1], int64, float32)"
    assert TABLE.values(x=3.0, a="A", n=2) == ("A", 2, 3.0)


@pytest.mark.parametrize("named, missing, unknown", [(dict(a=1, n=2), ["x"], []), (dict(a=1, n=2, x=3, y=4), [], ["y"])])
def test_a_missing_or_unknown_argument_is_refused(named, missing, unknown):
    with pytest.raises(KernelArgumentError, match=re.escape(f"missing arguments {missing}, unknown arguments {unknown}")):
        TABLE.values(**named)


def test_a_kernel_whose_parameters_differ_from_its_table_is_refused():
    def toy(a, x, n):
        pass

    with pytest.raises(KernelArgumentError, match="differ from its argument table"):
        TABLE.check(toy)
    with pytest.raises(KernelArgumentError, match="duplicate"):
        KernelArgs("dup", (("a", "int64"), ("a", "int32")))


def test_every_kernel_template_matches_its_table():
    # building a template runs its table's check; the signatures compile_check uses come from the tables
    make_decode_kernel(DecodeConfig(prim.F16, 64, 2, 2))
    make_prefill_kernel(PrefillConfig(prim.BF16, 64, 2, True, True, threads=32))
    make_partial_merge_kernel(prim.F32)
    make_append_kernel()
    assert decode_signature() == DECODE_ARGS.signature and DECODE_ARGS.signature.count(",") == len(DECODE_ARGS.names) - 1
    assert prefill_signature() == PREFILL_ARGS.signature and PARTIAL_MERGE_SIGNATURE == PARTIAL_MERGE_ARGS.signature
    assert {"q_stride_b", "page_size", "params"} <= set(DECODE_ARGS.names)
    assert {"row_qo_pos", "use_positions"} <= set(PREFILL_ARGS.names) and "k_cache_words" in APPEND_ARGS.names
