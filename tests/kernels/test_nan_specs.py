"""The NaN rules reach the GPU build: every softmax attention / merge kernel spec expects the
``setp.nan`` of nan_max in its PTX (compile-check fails without it), and every spec compiles with
fast-math flags that keep NaN and Inf (no ``fast``, ``nnan`` or ``ninf``)."""

from __future__ import annotations

import math

import pytest

from tilegraph.kernels import decode, merge, nan, prefill


@pytest.mark.parametrize("module", [decode, prefill, merge], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_softmax_specs_expect_the_nan_select_and_keep_nan_math(module):
    specs = module.gpu_compile_specs()
    assert specs
    with_nan = 0
    for spec in specs:
        flags = spec.fastmath
        assert isinstance(flags, (set, frozenset)) and not flags & {"fast", "nnan", "ninf"}, (spec.name, flags)
        if nan.NAN_PTX in spec.expect:
            with_nan += 1
    softmax_free = sum(1 for s in specs if "sigmoid" in s.name)
    assert with_nan >= len(specs) - softmax_free, [s.name for s in specs if nan.NAN_PTX not in s.expect]


def test_nan_max_propagates_both_ways():
    assert math.isnan(nan.nan_max(math.nan, 1.0)) and math.isnan(nan.nan_max(1.0, math.nan))
    assert nan.nan_max(-math.inf, 2.0) == 2.0 and nan.nan_max(3.0, 2.0) == 3.0
    assert nan.is_nan(math.nan) and not nan.is_nan(math.inf)
