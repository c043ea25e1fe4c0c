"""Causal qo_len > kv_len (FlashInfer's semantics, once an InputError): query rows that see no key
get output 0 and LSE -inf, the rest normal attention -- paged and ragged, split and unsplit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph

from .test_prefill import check, make_cache, paged_kv_of, reference, tables

# 2 blind rows, 3 blind rows (no KV), normal, square, and 2 blind rows of a KV long enough to split
REQUESTS = [(5, 3), (3, 0), (2, 6), (4, 4), (42, 40)]


def settings_for(num_ctas):
    return tilegraph.Settings(num_qo_heads=1, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=5, max_num_pages=16, max_num_tokens=64, num_ctas=num_ctas)  # fmt: skip


def blind_rows(requests):
    rows, start = [], 0
    for qo_len, kv_len in requests:
        rows += list(range(start, start + max(0, qo_len - kv_len)))
        start += qo_len
    return rows


@pytest.mark.parametrize("num_ctas", [1, 4])
def test_paged(device, num_ctas):
    settings = settings_for(num_ctas)
    rng = np.random.default_rng()
    qo, indptr, indices, last = tables(REQUESTS, 4, 16, rng)
    cache = make_cache(settings, device, pair=False)
    q = torch.randn(int(qo[-1]), 1, 16).half().to(device)
    pre = tilegraph.BatchPrefill(settings, causal=True, device=device)
    pre.plan(qo, indptr, indices, last)
    out = torch.full_like(q, float("nan"))
    got, lse = pre.run(q, cache, out=out, return_lse=True)
    ref_out, ref_lse = reference(q, settings, REQUESTS, True, paged_kv_of(cache, settings, indptr, indices, REQUESTS))
    check(got, lse, ref_out, ref_lse, settings.dtype, pre.current_plan)
    assert (pre.current_plan.num_merges > 0) == (num_ctas > 1), pre.current_plan
    blind = blind_rows(REQUESTS)
    assert (got[blind] == 0).all() and torch.isneginf(lse[blind]).all()


@pytest.mark.parametrize("num_ctas", [1, 4])
def test_ragged(device, num_ctas):
    settings = settings_for(num_ctas)
    kv_lens = [kv for _, kv in REQUESTS]
    qo = torch.tensor(np.concatenate([[0], np.cumsum([q for q, _ in REQUESTS])]), dtype=torch.int32)
    kv_indptr = torch.tensor(np.concatenate([[0], np.cumsum(kv_lens)]), dtype=torch.int32)
    q = torch.randn(int(qo[-1]), 1, 16).half().to(device)
    k = torch.randn(int(kv_indptr[-1]), 1, 16).half().to(device)
    v = torch.randn_like(k)
    ragged = tilegraph.BatchPrefillRagged(settings, causal=True, device=device)
    ragged.plan(qo, kv_indptr)
    got, lse = ragged.run(q, k, v, out=torch.full_like(q, float("nan")), return_lse=True)

    def kv_of(r):
        a, b = int(kv_indptr[r]), int(kv_indptr[r + 1])
        return k[a:b].double().cpu(), v[a:b].double().cpu()

    ref_out, ref_lse = reference(q, settings, REQUESTS, True, kv_of)
    check(got, lse, ref_out, ref_lse, settings.dtype, ragged.current_plan)
    blind = blind_rows(REQUESTS)
    assert (got[blind] == 0).all() and torch.isneginf(lse[blind]).all()
