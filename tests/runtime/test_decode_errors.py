"""Every bad input to BatchDecode raises a typed error naming the argument, before any launch,
and leaves `out` (poisoned) and the current plan untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import InputError, PlanError, StateError

BASE = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16", max_batch_size=3, max_num_pages=8,
            max_page_refs=6, num_ctas=2)  # fmt: skip
SETTINGS = tilegraph.Settings(**BASE)


@pytest.fixture(autouse=True, params=["cuda_cores", "tensor_cores"])
def engine(request, monkeypatch):
    """Every case on both decode engines: the same errors before any launch, whichever kernel runs."""
    monkeypatch.setitem(globals(), "SETTINGS", tilegraph.Settings(**BASE, decode_engine=request.param))
    return request.param
INDPTR = torch.tensor([0, 2, 3], dtype=torch.int32)
INDICES = torch.tensor([5, 1, 7], dtype=torch.int32)
LAST = torch.tensor([3, 4], dtype=torch.int32)


@pytest.fixture
def planned(device):
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    dec.plan(INDPTR, INDICES, LAST)
    cache = torch.randn(8, 2, 4, 2, 16).half().to(device)
    q = torch.randn(2, 4, 16).half().to(device)
    out = torch.full((2, 4, 16), float("nan")).half().to(device)
    return dec, q, cache, out


def _assert_untouched(out):
    assert torch.isnan(out).all(), "out was written although the call failed"


def test_run_before_plan(device):
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    with pytest.raises(StateError, match="plan"):
        dec.run(torch.randn(2, 4, 16).half(), torch.randn(8, 2, 4, 2, 16).half())


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q: q.float(), "q has dtype"),
        (lambda q: q[0], "q must be"),
        (lambda q: q[:, :2], "num_qo_heads"),
        (lambda q: q[:1], "batch size"),
        (lambda q: q.transpose(1, 2).contiguous().transpose(1, 2), "contiguous"),
        (lambda q: torch.zeros(2 * 4 * 16 + 1).half()[1:].view(2, 4, 16).copy_(q), "16-byte aligned"),
        (lambda q: q.numpy(), "torch.Tensor"),
    ],
    ids=["dtype", "rank", "heads", "batch", "last-dim-stride", "misaligned", "numpy"],
)
def test_bad_q(planned, mutate, match):
    dec, q, cache, out = planned
    with pytest.raises(InputError, match=match):
        dec.run(mutate(q), cache, out=out)
    _assert_untouched(out)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.float(), "dtype"),
        (lambda c: c[:, :, :2].contiguous(), "does not match"),
        (lambda c: c.transpose(2, 3), "does not match|contiguous"),
        (lambda c: c[:7], "pages"),
        (lambda c: (c[:, 0].contiguous(), c[:, 1, :, :1].contiguous()), "differs"),
        (lambda c: (c[:, 0].contiguous(), c[:, 1].contiguous(), c[:, 1].contiguous()), "pair"),
        (lambda c: c[:, 0].contiguous(), "5-D"),
    ],
    ids=["dtype", "shape", "layout", "too-few-pages", "pair-mismatch", "triple", "rank"],
)
def test_bad_cache(planned, mutate, match):
    dec, q, cache, out = planned
    with pytest.raises(InputError, match=match):
        dec.run(q, mutate(cache), out=out)
    _assert_untouched(out)


@pytest.mark.parametrize(
    "make_out, match",
    [
        (lambda out: out.float(), "out has dtype"),
        (lambda out: out[:1], "shape"),
        (lambda out: out.transpose(1, 2).contiguous().transpose(1, 2), "contiguous"),
    ],
    ids=["dtype", "shape", "strided"],
)
def test_bad_out(planned, make_out, match):
    dec, q, cache, out = planned
    bad = make_out(out)
    with pytest.raises(InputError, match=match):
        dec.run(q, cache, out=bad)
    _assert_untouched(bad)


@pytest.mark.parametrize(
    "indptr, indices, last, error, match",
    [
        ([0, 2, 3], np.array([5, 1, 7], np.int64), [3, 4], InputError, "kv_indices"),
        (np.array([0, 2, 3], np.int64), [5, 1, 7], [3, 4], InputError, "kv_indptr"),
        ([0, 2, 3], [5, 1, 7], [3], InputError, "kv_last_page_len"),
        ([1, 2, 3], [5, 1, 7], [3, 4], InputError, "kv_indptr"),
        ([0, 3, 2], [5, 1, 7], [3, 4], InputError, "kv_indptr"),
        ([0, 2, 4], [5, 1, 7], [3, 4], InputError, "kv_indptr|kv_indices"),
        ([0, 2, 3], [5, 8, 7], [3, 4], InputError, "kv_indices"),
        ([0, 2, 3], [5, -1, 7], [3, 4], InputError, "kv_indices"),
        ([0, 2, 3], [5, 1, 7], [0, 4], InputError, "kv_last_page_len"),
        ([0, 2, 3], [5, 1, 7], [3, 5], InputError, "kv_last_page_len"),
        ([0, 1, 2, 3, 3], [5, 1, 7], [3, 4, 1, 1], PlanError, "max_batch_size"),
        ([0, 7], [0, 1, 2, 3, 4, 5, 6], [1], PlanError, "max_page_refs"),
    ],
    ids=["indices-int64", "indptr-int64", "last-length", "indptr-start", "indptr-decreasing", "indptr-beyond",
         "page-outside-pool", "page-negative", "last-zero", "last-above-page-size", "batch-too-big", "refs-too-many"],
)  # fmt: skip
def test_bad_page_table(device, indptr, indices, last, error, match):
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    good = dec.plan(INDPTR, INDICES, LAST)
    as_i32 = lambda a: a if isinstance(a, np.ndarray) else np.asarray(a, dtype=np.int32)  # noqa: E731
    with pytest.raises(error, match=match):
        dec.plan(as_i32(indptr), as_i32(indices), as_i32(last))
    assert dec.current_plan is good


def test_empty_request_ignores_last_page_len(device):
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    plan = dec.plan(np.array([0, 0, 1], np.int32), np.array([3], np.int32), np.array([0, 2], np.int32))
    assert plan.batch_size == 2


def test_workspace_nbytes_is_a_function_of_settings(device):
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    assert dec.workspace_nbytes == tilegraph.workspace_nbytes(SETTINGS, device) == dec.workspace.nbytes
    bigger = tilegraph.Settings(**{**SETTINGS.model_dump(), "max_batch_size": 6})
    assert tilegraph.workspace_nbytes(bigger, device) > dec.workspace_nbytes
