"""Strided KV caches and ragged K/V: any view with a contiguous, 16-byte aligned last dimension is
read (and written by append_kv) in place -- a slice of a larger pool, vLLM's packed per-layer cache
split in its last dimension, k / v sliced from a fused QKV output. Each case checks against float64
and, for writes, that nothing outside the written slots changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.errors import InputError
from tilegraph.serving.reference import attention_reference, decode_reference, gather_kv, relative_error

HKV, HQ, HD, PS, PAGES = 2, 4, 16, 4, 12


def settings(layout="NHD"):
    return tilegraph.Settings(num_qo_heads=HQ, num_kv_heads=HKV, head_dim=HD, page_size=PS, dtype="float16",
                              kv_layout=layout, max_batch_size=4, max_num_pages=PAGES, max_num_tokens=16, num_ctas=2)  # fmt: skip


def table(kv_lens, rng):
    pages = rng.permutation(PAGES).astype(np.int32)
    counts = [-(-n // PS) for n in kv_lens]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(n - 1) % PS + 1 for n in kv_lens], np.int32)
    return indptr, pages[: indptr[-1]], last


def packed_pair(device, layout):
    """vLLM's per-layer cache [num_blocks, block_size, Hkv, 2*D] (HND: [num_blocks, Hkv, block_size, 2*D]),
    K and V split in the last dimension."""
    inner = (PS, HKV) if layout == "NHD" else (HKV, PS)
    packed = torch.randn(PAGES, *inner, 2 * HD).half().to(device)
    return packed, (packed[..., :HD], packed[..., HD:])


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_reads_vllm_packed_cache_views(device, layout):
    rng = np.random.default_rng()
    s = settings(layout)
    _, pair = packed_pair(device, layout)
    assert not pair[0].is_contiguous()
    dec = tilegraph.BatchDecode(s, device=device)
    t = table([7, 3, 10], rng)
    dec.plan(*t)
    q = torch.randn(3, HQ, HD).half().to(device)
    out = torch.full_like(q, float("nan"))
    dec.run(q, pair, out=out)
    assert relative_error(out, decode_reference(q, pair, s, *t)[0]) < 4e-3


def test_decode_reads_a_page_strided_slice_of_a_larger_pool(device):
    rng = np.random.default_rng()
    s = settings()
    pool = torch.randn(2 * PAGES, 2, PS, HKV, HD).half().to(device)
    cache = pool[::2]  # every other page: page stride doubled
    assert not cache.is_contiguous()
    dec = tilegraph.BatchDecode(s, device=device)
    t = table([5, 9], rng)
    dec.plan(*t)
    q = torch.randn(2, HQ, HD).half().to(device)
    out = dec.run(q, cache)
    assert relative_error(out, decode_reference(q, cache, s, *t)[0]) < 4e-3


def test_paged_prefill_reads_packed_views(device):
    rng = np.random.default_rng()
    s = settings()
    _, pair = packed_pair(device, "NHD")
    pre = tilegraph.BatchPrefill(s, causal=True, device=device)
    kv_lens, qo_lens = [6, 9], [2, 3]
    t = table(kv_lens, rng)
    qo_indptr = np.array([0, 2, 5], np.int32)
    pre.plan(qo_indptr, *t)
    q = torch.randn(5, HQ, HD).half().to(device)
    out = pre.run(q, pair)
    for r in range(2):
        pages = torch.as_tensor(t[1][t[0][r] : t[0][r + 1]]).long()
        k, v = gather_kv(pair, s, pages, kv_lens[r])
        ref, _ = attention_reference(q[qo_indptr[r] : qo_indptr[r + 1]], k, v, s.sm_scale, causal_offset=kv_lens[r] - qo_lens[r])
        assert relative_error(out[qo_indptr[r] : qo_indptr[r + 1]], ref) < 4e-3


def test_ragged_prefill_takes_k_and_v_sliced_from_a_fused_qkv(device):
    s = settings()
    n = 7
    qkv = torch.randn(n, (HQ + 2 * HKV) * HD).half().to(device)
    q = qkv[:, : HQ * HD].view(n, HQ, HD)
    k = qkv[:, HQ * HD : (HQ + HKV) * HD].view(n, HKV, HD)
    v = qkv[:, (HQ + HKV) * HD :].view(n, HKV, HD)
    assert not k.is_contiguous() and k.stride() == v.stride()
    rag = tilegraph.BatchPrefillRagged(s, causal=True, device=device)
    indptr = np.array([0, 3, 7], np.int32)
    rag.plan(indptr, indptr)
    out = rag.run(q, k, v)
    for r in range(2):
        rows = slice(indptr[r], indptr[r + 1])
        ref, _ = attention_reference(q[rows], k[rows].double(), v[rows].double(), s.sm_scale, causal_offset=0)
        assert relative_error(out[rows], ref) < 4e-3


def test_append_kv_writes_into_packed_views_and_nothing_else(device):
    s = settings()
    packed, pair = packed_pair(device, "NHD")
    before = packed.clone()
    nnz = 5
    k, v = torch.randn(nnz, HKV, HD).half().to(device), torch.randn(nnz, HKV, HD).half().to(device)
    kv_indptr = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    kv_indices = torch.tensor([4, 9, 2], dtype=torch.int32, device=device)
    batch = torch.tensor([0, 0, 0, 1, -1], dtype=torch.int32, device=device)  # the last row is padding
    pos = torch.tensor([0, 3, 5, 1, 0], dtype=torch.int32, device=device)
    tilegraph.append_kv(k, v, pair, batch, pos, kv_indptr, kv_indices, s)
    expected = before.clone()
    for row, (b, p) in enumerate(zip(batch.tolist(), pos.tolist())):
        if b < 0:
            continue
        page = int(kv_indices[int(kv_indptr[b]) + p // PS])
        expected[page, p % PS, :, :HD] = k[row]
        expected[page, p % PS, :, HD:] = v[row]
    assert torch.equal(packed, expected)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda c: c.transpose(-1, -2).contiguous().transpose(-1, -2), "last dimension"),
        (lambda c: torch.as_strided(c, c.shape, (c.stride(0) + 1, *c.stride()[1:]), 0), "16-byte aligned"),
        (lambda c: (c[:, 0], c[:, 1].contiguous()), "strides"),
    ],
    ids=["last-dim-strided", "misaligned-page-stride", "k-v-strides-differ"],
)
def test_views_the_kernels_cannot_address_are_refused(device, make, match):
    rng = np.random.default_rng()
    dec = tilegraph.BatchDecode(settings(), device=device)
    dec.plan(*table([5], rng))
    cache = torch.randn(PAGES + 1, 2, PS, HKV, HD).half().to(device)
    q = torch.randn(1, HQ, HD).half().to(device)
    out = torch.full_like(q, float("nan"))
    with pytest.raises(InputError, match=match):
        dec.run(q, make(cache[:PAGES]), out=out)
    assert out.isnan().all()
