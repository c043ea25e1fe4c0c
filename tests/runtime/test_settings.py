"""Settings: defaults, environment overrides, torch dtypes, and errors that name the field."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

import tilegraph
from tilegraph import errors

BASE = dict(num_qo_heads=8, num_kv_heads=2, head_dim=64)


def test_defaults_are_resolved():
    s = tilegraph.Settings(**BASE)
    assert s.sm_scale == pytest.approx(1 / math.sqrt(64))
    assert s.max_page_refs == s.max_num_pages
    assert s.group_size == 4 and s.torch_dtype == torch.float16
    assert s.graph_batch_sizes[:4] == (1, 2, 4, 8) and s.graph_batch_sizes[-1] == 256
    assert all(b <= s.max_batch_size for b in s.graph_batch_sizes)


def test_torch_dtype_is_stored_by_name():
    assert tilegraph.Settings(**BASE, dtype=torch.bfloat16).dtype == "bfloat16"
    with pytest.raises(pydantic.ValidationError, match="dtype"):
        tilegraph.Settings(**BASE, dtype=torch.int8)


def test_environment_overrides_and_keywords_win(monkeypatch):
    monkeypatch.setenv("TILEGRAPH_PAGE_SIZE", "4")
    monkeypatch.setenv("TILEGRAPH_KV_LAYOUT", "HND")
    monkeypatch.setenv("TILEGRAPH_GRAPHS__BATCH_SIZES", "[4, 1, 2]")
    s = tilegraph.Settings(**BASE)
    assert (s.page_size, s.kv_layout, s.graph_batch_sizes) == (4, "HND", (1, 2, 4))
    assert tilegraph.Settings(**BASE, page_size=8).page_size == 8


def test_frozen():
    s = tilegraph.Settings(**BASE)
    with pytest.raises(pydantic.ValidationError):
        s.page_size = 3


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(head_dim=40), "head_dim"),
        (dict(head_dim=272), "head_dim"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(page_size=0), "page_size"),
        (dict(kv_layout="NDH"), "kv_layout"),
        (dict(dtype="float64"), "dtype"),
        (dict(sm_scale=-1.0), "sm_scale"),
        (dict(max_batch_size=0), "max_batch_size"),
        (dict(num_ctas=0), "num_ctas"),
        (dict(unknown_field=1), "unknown_field"),
        (dict(graphs={"batch_sizes": [1, 512]}), "max_batch_size"),
        (dict(graphs={"batch_sizes": []}), "batch_sizes"),
    ],
)
def test_impossible_values_name_the_field(overrides, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        tilegraph.Settings(**{**BASE, **overrides})


def test_error_hierarchy():
    assert issubclass(errors.InputError, ValueError) and issubclass(errors.InputError, errors.TilegraphError)
    assert issubclass(errors.PlanError, ValueError) and issubclass(errors.PlanError, errors.TilegraphError)
    assert issubclass(errors.StateError, RuntimeError) and issubclass(errors.StateError, errors.TilegraphError)
    assert issubclass(errors.DeviceError, RuntimeError)
    assert tilegraph.InputError is errors.InputError


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_sm_scale_must_be_finite(value):
    with pytest.raises(pydantic.ValidationError, match="sm_scale"):
        tilegraph.Settings(**BASE, sm_scale=value)


@pytest.mark.parametrize("text", ["inf", "nan", "-inf"])
def test_sm_scale_from_the_environment_must_be_finite(monkeypatch, text):
    monkeypatch.setenv("TILEGRAPH_SM_SCALE", text)
    with pytest.raises(pydantic.ValidationError, match="sm_scale"):
        tilegraph.Settings(**BASE)


@pytest.mark.parametrize("overrides, field", [(dict(max_page_refs=2**31), "max_page_refs"),
                                              (dict(max_batch_size=65536, max_cascade_groups=70000), "max_cascade_groups")])
def test_capacities_have_upper_bounds(overrides, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        tilegraph.Settings(**{**BASE, **overrides})
