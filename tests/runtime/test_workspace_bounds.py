"""Capacities are bounded by what the device can hold: a workspace that cannot fit is refused with a
PlanError naming the Settings field and the bytes, before anything is allocated."""

from __future__ import annotations

import pytest

import tilegraph
from tilegraph import checks

DEVICE = "cpu" if tilegraph.SIMULATOR else "cuda"

BASE = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16)


@pytest.fixture
def small_device(monkeypatch):
    monkeypatch.setattr(checks, "available_bytes", lambda device: (4 << 20, 4 << 20))  # 4 MiB free


@pytest.mark.parametrize(
    "cls, overrides, field",
    [
        (tilegraph.BatchDecode, dict(max_page_refs=1 << 22), "max_page_refs"),
        (tilegraph.BatchPrefill, dict(max_page_refs=1 << 22), "max_page_refs"),
        (tilegraph.BatchPrefill, dict(max_num_tokens=1 << 20), "max_num_tokens"),
        (tilegraph.BatchPrefillRagged, dict(max_num_tokens=1 << 20), "max_num_tokens"),
    ],
)
def test_a_workspace_beyond_the_device_names_the_field_and_bytes(small_device, cls, overrides, field):
    settings = tilegraph.Settings(**BASE, **overrides)
    with pytest.raises(tilegraph.PlanError, match=rf"Settings\.{field}=\d+ sizes a workspace of \d+ device bytes"):
        cls(settings, device=DEVICE)


def test_default_capacities_fit(small_device):
    tilegraph.BatchDecode(tilegraph.Settings(**BASE), device=DEVICE)


def test_real_free_memory_is_positive():
    free_device, free_host = checks.available_bytes(__import__("torch").device(DEVICE))
    assert free_device > 0 and free_host > 0
