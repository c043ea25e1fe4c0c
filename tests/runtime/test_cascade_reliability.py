"""CascadeAttention edge cases that used to fail: a causal last level with more query rows than
suffix tokens (FlashInfer's per-level semantics: rows that see no suffix key attend the shared
levels only; once an InputError), and ``request_kv_len`` / byte statistics with 0-query requests
(once the next request's suffix length)."""

from __future__ import annotations

import numpy as np
import torch

import tilegraph
from tilegraph.cascade import CascadeAttention, LevelTable
from tilegraph.serving.reference import attention_reference, gather_kv

from .test_cascade import BASE, build_levels, check, make_cache


def per_level_causal_reference(q, cache, settings, requests, seen):
    """float64: row i of a request (qo_len q, suffix S) attends every shared level in full and the
    suffix positions <= S - q + i (none when negative)."""
    outs, lses, start = [], [], 0
    for (qo_len, suffix_len), levels in zip(requests, seen):
        parts = [gather_kv(cache, settings, torch.as_tensor(pages, dtype=torch.long), kv_len) for pages, kv_len in levels]
        k, v = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        prefix = k.shape[0] - suffix_len
        rows_out, rows_lse = [], []
        for i in range(qo_len):
            visible = prefix + max(0, suffix_len - qo_len + i + 1)
            out, lse = attention_reference(q[start + i : start + i + 1], k[:visible], v[:visible], settings.sm_scale)
            rows_out.append(out)
            rows_lse.append(lse)
        outs += rows_out
        lses += rows_lse
        start += qo_len
    return torch.cat(outs), torch.cat(lses)


def test_causal_last_level_rows_beyond_the_suffix(device):
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**{**BASE, "dtype": "float32", "num_qo_heads": 2, "num_kv_heads": 1})
    requests = [(4, 2), (3, 0), (2, 5), (3, 3)]  # 2 blind rows, 3 blind (empty suffix), normal, square
    tables, seen = build_levels(requests, [[(2, 6), (2, 3)]], settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device)
    rows = int(tables[-1].qo_indptr[-1])
    q = torch.randn(rows, 2, 16).to(device)
    cascade = CascadeAttention(settings, num_levels=2, causal=True, device=device)
    plan = cascade.plan(tables)
    out, lse = cascade.run(q, cache, out=torch.full_like(q, float("nan")), return_lse=True)
    check(out, lse, *per_level_causal_reference(q, cache, settings, requests, seen), settings.dtype, plan)


def test_request_kv_len_with_zero_query_requests(device):
    settings = tilegraph.Settings(**BASE)
    # requests: 1 row, 0 rows, 2 rows; suffixes 3, 5, 7 tokens; one group (prefix 6 tokens) over all
    t0 = LevelTable(*(np.array(a, np.int32) for a in ([0, 3], [0, 2], [0, 1], [2])))
    t1 = LevelTable(*(np.array(a, np.int32) for a in ([0, 1, 1, 3], [0, 1, 3, 5], [2, 3, 4, 5, 6], [3, 1, 3])))
    cascade = CascadeAttention(settings, num_levels=2, device=device)
    plan = cascade.plan([t0, t1])
    assert plan.request_kv_len.tolist() == [[6, 0, 6], [3, 0, 7]]
    assert plan.flat_kv_tokens == 22
    per_token = 2 * settings.num_kv_heads * settings.head_dim * 2
    assert plan.kv_bytes(settings, flat=True) == 22 * per_token
