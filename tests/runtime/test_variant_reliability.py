"""Variant values and hooks that used to be accepted although wrong: soft-cap 0 means no soft-cap
(FlashInfer's convention) and a negative / infinite / NaN cap is refused; a hook numba cannot
compile is refused at ``Variant(...)`` on the simulator too (numba's nopython typing, no NRT)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tilegraph
from tilegraph import InputError, VariantError
from tilegraph import variants as V
from tilegraph.serving.reference import relative_error

from .test_variants import check, run_variant, variant_reference


def test_soft_cap_zero_is_no_soft_cap(device):
    s, q, cache, table, got, lse, plan = run_variant(V.soft_cap(0.0), device, "unsplit")
    check(s, got, lse, *variant_reference(q, cache, s, table), plan)  # plain attention


def test_soft_cap_zero_at_run_time(device):
    s, q, cache, table, got, lse, plan = run_variant(V.soft_cap(30.0), device, "unsplit", params={"logits_soft_cap": 0.0})
    assert relative_error(got, variant_reference(q, cache, s, table)[0]) < 4e-3


@pytest.mark.parametrize("cap", [-1.0, math.inf, -math.inf, math.nan])
def test_bad_soft_cap_is_refused_at_construction(cap):
    with pytest.raises(VariantError, match="logits_soft_cap"):
        V.soft_cap(cap)


@pytest.mark.parametrize("cap", [-0.5, math.inf])
def test_bad_soft_cap_is_refused_at_run_time(device, cap):
    settings = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, max_batch_size=2, max_num_pages=4)
    dec = tilegraph.BatchDecode(settings, variant=V.soft_cap(30.0), device=device)
    before = dec.params.clone()
    with pytest.raises(InputError, match=r"params\['logits_soft_cap'\] must be finite and >= 0"):
        dec.set_params({"logits_soft_cap": cap})
    assert dec.params.equal(before)


def test_soft_cap_needs_a_number():
    with pytest.raises(VariantError, match="cap must be a number"):
        V.soft_cap("thirty")


def _uses_a_dict(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
    table = {0: score}
    return table[0]


def _allocates(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
    scratch = np.empty(2, np.float32)
    scratch[0] = score
    return scratch[0]


def _returns_a_string(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
    return str(score)


def _mask_returns_a_tuple(request, qo_pos, kv_pos, qo_head, kv_head, params):
    return (qo_pos, kv_pos)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(logits_transform=_uses_a_dict), "_uses_a_dict"),
        (dict(logits_transform=_allocates), "_allocates"),
        (dict(logits_transform=_returns_a_string), "_returns_a_string"),
        (dict(logits_mask=_mask_returns_a_tuple), "_mask_returns_a_tuple"),
    ],
)
def test_hooks_numba_cannot_compile_are_refused_in_both_modes(kwargs, name):
    with pytest.raises(VariantError, match=name):
        tilegraph.Variant("bad", **kwargs)


def _helper(x):
    return x * np.float32(0.5)


def _calls_a_helper(score, request, qo_pos, kv_pos, qo_head, kv_head, params, rate):
    return _helper(score) - params[rate] * (qo_pos - kv_pos)


def test_hooks_that_compile_are_still_accepted():
    helper_dev = tilegraph._device.cuda.jit(device=True)(_helper)
    glob = dict(_calls_a_helper.__globals__, _helper=helper_dev)
    import types

    via_device_fn = types.FunctionType(_calls_a_helper.__code__, glob, "_calls_a_device_helper")
    tilegraph.Variant("ok", logits_transform=via_device_fn, params={"rate": "scalar"})
    with pytest.raises(VariantError, match="_calls_a_helper"):  # a plain Python helper: untyped, as on a GPU
        tilegraph.Variant("plain", logits_transform=_calls_a_helper, params={"rate": "scalar"})
    for make in (V.soft_cap, V.alibi, V.rope, V.sigmoid_attention, V.custom_mask, V.attention_sinks):
        make()
    V.sliding_window(8)


def test_bad_param_objects_are_refused():
    with pytest.raises(VariantError, match="Param objects"):
        tilegraph.Variant("x", params=["rate"])
