"""Every bad input to BatchPrefill / BatchPrefillRagged raises a typed error naming the argument,
before any launch, and leaves `out` (poisoned) and the current plan untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import InputError, PlanError, StateError

SETTINGS = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=3, max_num_pages=8, max_page_refs=6, max_num_tokens=10,
                              num_ctas=2)  # fmt: skip
QO = torch.tensor([0, 3, 4], dtype=torch.int32)
INDPTR = torch.tensor([0, 2, 3], dtype=torch.int32)
INDICES = torch.tensor([5, 1, 7], dtype=torch.int32)
LAST = torch.tensor([3, 4], dtype=torch.int32)  # kv_len 7 and 4


@pytest.fixture
def planned(device):
    pre = tilegraph.BatchPrefill(SETTINGS, causal=True, device=device)
    pre.plan(QO, INDPTR, INDICES, LAST)
    cache = torch.randn(8, 2, 4, 2, 16).half().to(device)
    q = torch.randn(4, 4, 16).half().to(device)
    out = torch.full((4, 4, 16), float("nan")).half().to(device)
    return pre, q, cache, out


@pytest.fixture
def planned_ragged(device):
    pre = tilegraph.BatchPrefillRagged(SETTINGS, causal=False, device=device)
    pre.plan(QO, torch.tensor([0, 6, 9], dtype=torch.int32))
    k = torch.randn(9, 2, 16).half().to(device)
    v = torch.randn(9, 2, 16).half().to(device)
    q = torch.randn(4, 4, 16).half().to(device)
    out = torch.full((4, 4, 16), float("nan")).half().to(device)
    return pre, q, k, v, out


def _assert_untouched(out):
    assert torch.isnan(out).all(), "out was written although the call failed"


def test_run_before_plan(device):
    pre = tilegraph.BatchPrefill(SETTINGS, device=device)
    with pytest.raises(StateError, match="plan"):
        pre.run(torch.randn(4, 4, 16).half(), torch.randn(8, 2, 4, 2, 16).half())
    rag = tilegraph.BatchPrefillRagged(SETTINGS, device=device)
    with pytest.raises(StateError, match="plan"):
        rag.run(torch.randn(4, 4, 16).half(), torch.randn(9, 2, 16).half(), torch.randn(9, 2, 16).half())


BAD_Q = [
    (lambda q: q.float(), "q has dtype"),
    (lambda q: q[0], "q must be"),
    (lambda q: q[:, :2], "num_qo_heads"),
    (lambda q: q[:3], "query tokens"),
    (lambda q: q.transpose(1, 2).contiguous().transpose(1, 2), "contiguous"),
    (lambda q: torch.zeros(4 * 4 * 16 + 1).half()[1:].view(4, 4, 16).copy_(q), "16-byte aligned"),
    (lambda q: q.numpy(), "torch.Tensor"),
]
BAD_Q_IDS = ["dtype", "rank", "heads", "tokens", "last-dim-stride", "misaligned", "numpy"]


@pytest.mark.parametrize("mutate, match", BAD_Q, ids=BAD_Q_IDS)
def test_bad_q(planned, mutate, match):
    pre, q, cache, out = planned
    with pytest.raises(InputError, match=match):
        pre.run(mutate(q), cache, out=out)
    _assert_untouched(out)


@pytest.mark.parametrize("mutate, match", BAD_Q, ids=BAD_Q_IDS)
def test_bad_q_ragged(planned_ragged, mutate, match):
    pre, q, k, v, out = planned_ragged
    with pytest.raises(InputError, match=match):
        pre.run(mutate(q), k, v, out=out)
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
    pre, q, cache, out = planned
    with pytest.raises(InputError, match=match):
        pre.run(q, mutate(cache), out=out)
    _assert_untouched(out)


@pytest.mark.parametrize(
    "which, mutate, match",
    [
        ("k", lambda t: t.float(), "k has dtype"),
        ("v", lambda t: t[:, :1].contiguous(), "v must be"),
        ("k", lambda t: t[:8], "k has 8 rows but kv_indptr\\[-1\\] = 9"),
        ("v", lambda t: t.transpose(0, 1).contiguous().transpose(0, 1), "contiguous"),
        ("k", lambda t: t.numpy(), "k must be a torch.Tensor"),
    ],
    ids=["dtype", "heads", "too-few-rows", "strided", "numpy"],
)
def test_bad_ragged_kv(planned_ragged, which, mutate, match):
    pre, q, k, v, out = planned_ragged
    k, v = (mutate(k), v) if which == "k" else (k, mutate(v))
    with pytest.raises(InputError, match=match):
        pre.run(q, k, v, out=out)
    _assert_untouched(out)


@pytest.mark.parametrize(
    "make_out, match",
    [
        (lambda out: out.float(), "out has dtype"),
        (lambda out: out[:3], "shape"),
        (lambda out: out.transpose(1, 2).contiguous().transpose(1, 2), "contiguous"),
    ],
    ids=["dtype", "shape", "strided"],
)
def test_bad_out(planned, make_out, match):
    pre, q, cache, out = planned
    bad = make_out(out)
    with pytest.raises(InputError, match=match):
        pre.run(q, cache, out=bad)
    _assert_untouched(bad)


@pytest.mark.parametrize(
    "qo, indptr, indices, last, error, match",
    [
        ([0, 3, 4], [0, 2, 3], np.array([5, 1, 7], np.int64), [3, 4], InputError, "kv_indices"),
        (np.array([0, 3, 4], np.int64), [0, 2, 3], [5, 1, 7], [3, 4], InputError, "qo_indptr"),
        ([0, 3, 4], np.array([0, 2, 3], np.int64), [5, 1, 7], [3, 4], InputError, "kv_indptr"),
        ([0, 3, 4], [0, 2, 3], [5, 1, 7], [3], InputError, "kv_last_page_len"),
        ([0, 3, 4], [0, 2], [5, 1, 7], [3, 4], InputError, "kv_indptr must have"),
        ([1, 3, 4], [0, 2, 3], [5, 1, 7], [3, 4], InputError, "qo_indptr\\[0\\]"),
        ([0, 4, 3], [0, 2, 3], [5, 1, 7], [3, 4], InputError, "qo_indptr must be non-decreasing"),
        ([0, 3, 4], [1, 2, 3], [5, 1, 7], [3, 4], InputError, "kv_indptr"),
        ([0, 3, 4], [0, 3, 2], [5, 1, 7], [3, 4], InputError, "kv_indptr"),
        ([0, 3, 4], [0, 2, 4], [5, 1, 7], [3, 4], InputError, "kv_indptr|kv_indices"),
        ([0, 3, 4], [0, 2, 3], [5, 8, 7], [3, 4], InputError, "kv_indices"),
        ([0, 3, 4], [0, 2, 3], [5, -1, 7], [3, 4], InputError, "kv_indices"),
        ([0, 3, 4], [0, 2, 3], [5, 1, 7], [0, 4], InputError, "kv_last_page_len"),
        ([0, 3, 4], [0, 2, 3], [5, 1, 7], [3, 5], InputError, "kv_last_page_len"),
        ([0, 3, 11], [0, 2, 5], [5, 1, 7, 2, 3], [3, 4], PlanError, "max_num_tokens"),
        ([0, 1, 2, 3, 4], [0, 1, 2, 3, 3], [5, 1, 7], [3, 4, 1, 1], PlanError, "max_batch_size"),
        ([0, 1], [0, 7], [0, 1, 2, 3, 4, 5, 6], [1], PlanError, "max_page_refs"),
    ],
    ids=["indices-int64", "qo-int64", "indptr-int64", "last-length", "indptr-length", "qo-start", "qo-decreasing",
         "indptr-start", "indptr-decreasing", "indptr-beyond", "page-outside-pool", "page-negative", "last-zero",
         "last-above-page-size", "tokens-too-many", "batch-too-big", "refs-too-many"],
)  # fmt: skip
def test_bad_tables(device, qo, indptr, indices, last, error, match):
    pre = tilegraph.BatchPrefill(SETTINGS, causal=True, device=device)
    good = pre.plan(QO, INDPTR, INDICES, LAST)
    as_i32 = lambda a: a if isinstance(a, np.ndarray) else np.asarray(a, dtype=np.int32)  # noqa: E731
    with pytest.raises(error, match=match):
        pre.plan(as_i32(qo), as_i32(indptr), as_i32(indices), as_i32(last))
    assert pre.current_plan is good


def test_padded_num_tokens_bounds(device):
    pre = tilegraph.BatchPrefill(SETTINGS, causal=True, device=device)
    good = pre.plan(QO, INDPTR, INDICES, LAST, padded_num_tokens=10)
    for bad in (3, 11):
        with pytest.raises(PlanError, match="padded_num_tokens"):
            pre.plan(QO, INDPTR, INDICES, LAST, padded_num_tokens=bad)
    assert pre.current_plan is good


def test_non_causal_allows_more_queries_than_kv(device):
    pre = tilegraph.BatchPrefill(SETTINGS, causal=False, device=device)
    plan = pre.plan(np.array([0, 9, 10], np.int32), INDPTR.numpy(), INDICES.numpy(), LAST.numpy())
    assert plan.num_tokens == 10


def test_workspace_nbytes_is_a_function_of_settings(device):
    from tilegraph.prefill import prefill_workspace_nbytes

    pre = tilegraph.BatchPrefill(SETTINGS, device=device)
    assert pre.workspace_nbytes == prefill_workspace_nbytes(SETTINGS, device) == pre.workspace.nbytes
    bigger = tilegraph.Settings(**{**SETTINGS.model_dump(), "max_num_tokens": 100})
    assert prefill_workspace_nbytes(bigger, device) > pre.workspace_nbytes


def test_max_num_tokens_setting_is_validated():
    with pytest.raises(ValueError, match="max_num_tokens"):
        tilegraph.Settings(num_qo_heads=1, num_kv_heads=1, head_dim=16, max_num_tokens=0)
    assert tilegraph.Settings(num_qo_heads=1, num_kv_heads=1, head_dim=16).max_num_tokens == 8192
