"""BatchPrefill / BatchPrefillRagged on the simulator (or a GPU) against the float64 reference.

Covering set over: qo lengths 1..40, KV with and without a prefix beyond the queries, causal and
not, page sizes 1/4/16, GQA groups 1-4 (and a two-pass group of 20), NHD/HND, pair caches, strided
q, every dtype, mixed decode + prefill batches, empty KV / empty queries, split and unsplit plans."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numba import float32

import tilegraph
from tilegraph._device import cuda
from tilegraph.kernels.decode import DecodeHooks
from tilegraph.serving.reference import attention_reference, gather_kv, relative_error

TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 1e-4}


def tables(requests, page_size, pool_pages, rng):
    """(qo_indptr, kv_indptr, kv_indices, kv_last_page_len) for [(qo_len, kv_len)], random distinct pages."""
    qo_lens = [qo for qo, _ in requests]
    kv_lens = [kv for _, kv in requests]
    counts = [-(-n // page_size) for n in kv_lens]
    pages = rng.permutation(pool_pages)[: sum(counts)].astype(np.int32)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(n - 1) % page_size + 1 if n else rng.integers(0, 99) for n in kv_lens], dtype=np.int32)
    return torch.from_numpy(qo_indptr), torch.from_numpy(kv_indptr), torch.from_numpy(pages), torch.from_numpy(last)


def make_cache(settings, device, pair):
    ps, hkv, hd, n = settings.page_size, settings.num_kv_heads, settings.head_dim, settings.max_num_pages
    inner = (ps, hkv, hd) if settings.kv_layout == "NHD" else (hkv, ps, hd)
    if pair:
        return tuple(torch.randn(n, *inner).to(settings.torch_dtype).to(device) for _ in range(2))
    return torch.randn(n, 2, *inner).to(settings.torch_dtype).to(device)


def make_q(settings, rows, device, strided=False):
    hq, hd = settings.num_qo_heads, settings.head_dim
    if not strided:
        return torch.randn(rows, hq, hd).to(settings.torch_dtype).to(device)
    hkv = settings.num_kv_heads  # q sliced out of a fused QKV projection
    qkv = torch.randn(rows, (hq + 2 * hkv) * hd).to(settings.torch_dtype).to(device)
    return qkv[:, : hq * hd].view(rows, hq, hd)


def reference(q, settings, requests, causal, kv_of):
    """float64 (out, lse) over the rows of ``requests``; ``kv_of(r)`` gives request r's K, V [kv_len, Hkv, D]."""
    outs, lses, start = [], [], 0
    for r, (qo_len, kv_len) in enumerate(requests):
        k, v = kv_of(r)
        offset = kv_len - qo_len if causal else None
        out, lse = attention_reference(q[start : start + qo_len], k, v, settings.sm_scale, offset)
        outs.append(out)
        lses.append(lse)
        start += qo_len
    return torch.cat(outs), torch.cat(lses)


def paged_kv_of(cache, settings, kv_indptr, kv_indices, requests):
    def kv_of(r):
        pages = kv_indices[int(kv_indptr[r]) : int(kv_indptr[r + 1])].long()
        return gather_kv(cache, settings, pages, requests[r][1])

    return kv_of


def check(got, lse, ref_out, ref_lse, dtype, context):
    assert relative_error(got, ref_out) < TOLERANCE[dtype], context
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert relative_error(lse.cpu()[finite], ref_lse[finite]) < 1e-4, context
        assert torch.isneginf(lse.cpu()[~finite]).all(), context


CASES = [
    # id, settings overrides, [(qo_len, kv_len)], causal, pair cache, strided q, out=, return_lse
    ("f16-NHD-g1-p16-causal-long-and-decode", dict(num_qo_heads=2, num_kv_heads=2, head_dim=16, page_size=16,
        dtype="float16"), [(40, 40), (1, 17)], True, False, False, True, True),
    ("bf16-HND-g2-p4-causal-prefix-mixed", dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4,
        dtype="bfloat16", kv_layout="HND"), [(7, 30), (1, 1), (12, 12), (0, 5), (1, 9)], True, False, False, False, True),
    ("f32-NHD-g4-p1-full-pair-strided-empty-kv", dict(num_qo_heads=4, num_kv_heads=1, head_dim=32, page_size=1,
        dtype="float32"), [(5, 9), (3, 0), (9, 4)], False, True, True, True, True),
    ("f16-NHD-g3-p4-causal-split", dict(num_qo_heads=6, num_kv_heads=2, head_dim=32, page_size=4, dtype="float16"),
        [(2, 90)], True, False, False, True, True),
    ("bf16-NHD-g1-p16-full-split-and-unsplit", dict(num_qo_heads=1, num_kv_heads=1, head_dim=16, page_size=16,
        dtype="bfloat16", num_ctas=6), [(1, 100), (20, 20)], False, False, False, False, True),
    ("f16-HND-g2-p1-causal-decode-split", dict(num_qo_heads=2, num_kv_heads=1, head_dim=48, page_size=1,
        dtype="float16", kv_layout="HND"), [(18, 30), (1, 70)], True, True, True, False, False),
    ("f32-NHD-g20-two-passes", dict(num_qo_heads=20, num_kv_heads=1, head_dim=16, page_size=4, dtype="float32"),
        [(3, 11)], True, False, False, True, True),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prefill_matches_reference(case, device):
    case_id, overrides, requests, causal, pair, strided, use_out, return_lse = case
    rng = np.random.default_rng()
    overrides = {"num_ctas": 4, **overrides}
    settings = tilegraph.Settings(max_batch_size=8, max_num_pages=128, max_num_tokens=64, **overrides)
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device, pair)
    rows = int(qo_indptr[-1])
    q = make_q(settings, rows, device, strided)
    pre = tilegraph.BatchPrefill(settings, causal=causal, device=device)
    plan = pre.plan(qo_indptr, kv_indptr, kv_indices, last)
    assert (plan.num_merges > 0) == ("split" in case_id), plan
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device) if use_out else None
    result = pre.run(q, cache, out=out, return_lse=return_lse)
    got, lse = result if return_lse else (result, None)
    if use_out:
        assert got.data_ptr() == out.data_ptr()
    ref_out, ref_lse = reference(q, settings, requests, causal, paged_kv_of(cache, settings, kv_indptr, kv_indices, requests))
    check(got, lse, ref_out, ref_lse, settings.dtype, plan)


def test_split_and_unsplit_agree(device):
    """The same mixed batch over 1 CTA (nothing split) and 8 CTAs (long KV split) gives the same answer."""
    rng = np.random.default_rng()
    base = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float32", max_batch_size=4,
                max_num_pages=64, max_num_tokens=32)  # fmt: skip
    requests = [(3, 120), (1, 40), (6, 6)]
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, 4, 64, rng)
    settings = tilegraph.Settings(**base)
    cache = make_cache(settings, device, False)
    q = make_q(settings, 10, device)
    results = []
    for num_ctas in (1, 8):
        pre = tilegraph.BatchPrefill(tilegraph.Settings(num_ctas=num_ctas, **base), causal=True, device=device)
        plan = pre.plan(qo_indptr, kv_indptr, kv_indices, last)
        results.append((plan.num_merges, pre.run(q, cache, return_lse=True)))
    assert results[0][0] == 0 and results[1][0] > 0, "expected no split on 1 CTA and a split on 8"
    assert relative_error(results[1][1][0], results[0][1][0].double()) < 1e-5
    assert relative_error(results[1][1][1], results[0][1][1].double()) < 1e-5
    ref_out, _ = reference(q, settings, requests, True, paged_kv_of(cache, settings, kv_indptr, kv_indices, requests))
    assert relative_error(results[1][1][0], ref_out) < 1e-4


def ragged_inputs(settings, requests, device):
    kv_indptr = torch.tensor(np.concatenate([[0], np.cumsum([kv for _, kv in requests])]), dtype=torch.int32)
    qo_indptr = torch.tensor(np.concatenate([[0], np.cumsum([qo for qo, _ in requests])]), dtype=torch.int32)
    shape = (int(kv_indptr[-1]) + 3, settings.num_kv_heads, settings.head_dim)  # 3 spare rows: never read
    k = torch.randn(shape).to(settings.torch_dtype).to(device)
    v = torch.randn(shape).to(settings.torch_dtype).to(device)
    return qo_indptr, kv_indptr, k, v


@pytest.mark.parametrize(
    "overrides, requests, causal",
    [
        (dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, dtype="float16"), [(9, 20), (1, 33), (4, 4)], True),
        (dict(num_qo_heads=3, num_kv_heads=1, head_dim=32, dtype="bfloat16"), [(2, 75), (5, 0), (6, 3)], False),
    ],
    ids=["f16-g2-causal-mixed", "bf16-g3-full-split-empty"],
)
def test_ragged_matches_reference(device, overrides, requests, causal):
    settings = tilegraph.Settings(max_batch_size=4, max_num_tokens=32, num_ctas=4, **overrides)
    qo_indptr, kv_indptr, k, v = ragged_inputs(settings, requests, device)
    q = make_q(settings, int(qo_indptr[-1]), device)
    pre = tilegraph.BatchPrefillRagged(settings, causal=causal, device=device)
    plan = pre.plan(qo_indptr, kv_indptr)
    out, lse = pre.run(q, k, v, return_lse=True)

    def kv_of(r):
        a, b = int(kv_indptr[r]), int(kv_indptr[r + 1])
        return k[a:b].double().cpu(), v[a:b].double().cpu()

    ref_out, ref_lse = reference(q, settings, requests, causal, kv_of)
    check(out, lse, ref_out, ref_lse, settings.dtype, plan)


def test_ragged_and_paged_agree(device):
    """The same K/V as a ragged tensor and scattered over pages (page_size 4): bitwise-equal outputs
    when both plans make the same tiles (same settings, same lengths)."""
    rng = np.random.default_rng()
    settings = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                                  max_batch_size=4, max_num_pages=32, max_num_tokens=32, num_ctas=3)  # fmt: skip
    requests = [(5, 13), (1, 22), (8, 8)]
    qo_indptr, kv_indptr, k, v = ragged_inputs(settings, requests, device)
    _, page_indptr, page_indices, last = tables(requests, 4, 32, rng)
    cache = torch.zeros(32, 2, 4, 1, 16, dtype=torch.float16, device=device)
    for r, (_, kv_len) in enumerate(requests):
        pages = page_indices[int(page_indptr[r]) : int(page_indptr[r + 1])].long()
        a = int(kv_indptr[r])
        for t in range(kv_len):
            cache[pages[t // 4], 0, t % 4] = k[a + t]
            cache[pages[t // 4], 1, t % 4] = v[a + t]
    q = make_q(settings, int(qo_indptr[-1]), device)
    ragged = tilegraph.BatchPrefillRagged(settings, causal=True, device=device)
    paged = tilegraph.BatchPrefill(settings, causal=True, device=device)
    ragged.plan(qo_indptr, kv_indptr)
    paged.plan(qo_indptr, page_indptr, page_indices, last)
    out_r, lse_r = ragged.run(q, k, v, return_lse=True)
    out_p, lse_p = paged.run(q, cache, return_lse=True)
    assert torch.equal(out_r, out_p) and torch.equal(lse_r, lse_p)


def test_padded_rows_untouched_and_empty_kv_rows_zero(device):
    """padded_num_tokens: rows past qo_indptr[-1] are neither read (NaN q) nor written (NaN out);
    a non-causal request without KV gets zeros and LSE -inf."""
    rng = np.random.default_rng()
    settings = tilegraph.Settings(num_qo_heads=2, num_kv_heads=2, head_dim=16, page_size=4, dtype="bfloat16",
                                  max_batch_size=4, max_num_pages=16, max_num_tokens=16, num_ctas=2)  # fmt: skip
    requests = [(3, 0), (2, 7)]
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, 4, 16, rng)
    cache = make_cache(settings, device, False)
    q = make_q(settings, 8, device)
    q[5:] = float("nan")
    pre = tilegraph.BatchPrefill(settings, causal=False, device=device)
    pre.plan(qo_indptr, kv_indptr, kv_indices, last, padded_num_tokens=8)
    out = torch.full((8, 2, 16), float("nan"), dtype=torch.bfloat16, device=device)
    _, lse = pre.run(q, cache, out=out, return_lse=True)
    assert torch.isnan(out[5:].cpu()).all()
    assert (out[:3].cpu() == 0).all() and torch.isneginf(lse[:3].cpu()).all()
    ref_out, _ = reference(q[:5], settings, requests, False, paged_kv_of(cache, settings, kv_indptr, kv_indices, requests))
    assert relative_error(out[3:5], ref_out[3:5]) < TOLERANCE["bfloat16"]


@pytest.mark.slow
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_prefill_grid_slow(device, page_size, group):
    """Larger sweep: page sizes x groups, both masks, a long mixed batch (split on 4 CTAs)."""
    rng = np.random.default_rng()
    settings = tilegraph.Settings(num_qo_heads=2 * group, num_kv_heads=2, head_dim=32, page_size=page_size,
                                  dtype="float16", max_batch_size=8, max_num_pages=512, max_num_tokens=128,
                                  num_ctas=4)  # fmt: skip
    requests = [(37, 50), (1, 130), (16, 16), (1, 3), (5, 64)]
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, page_size, 512, rng)
    cache = make_cache(settings, device, False)
    q = make_q(settings, int(qo_indptr[-1]), device)
    for causal in (True, False):
        pre = tilegraph.BatchPrefill(settings, causal=causal, device=device)
        plan = pre.plan(qo_indptr, kv_indptr, kv_indices, last)
        out, lse = pre.run(q, cache, return_lse=True)
        kv_of = paged_kv_of(cache, settings, kv_indptr, kv_indices, requests)
        check(out, lse, *reference(q, settings, requests, causal, kv_of), "float16", plan)


# ---- variant hooks (decode's DecodeHooks) see prefill positions: qo_pos = kv_len - qo_len + i ----

WINDOW, CAP = 6, 3.0


@cuda.jit(device=True, inline="always")
def _window_mask(request, qo_pos, kv_pos, qo_head, kv_head, params):
    return qo_pos - kv_pos < WINDOW


@cuda.jit(device=True, inline="always")
def _soft_cap(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
    return float32(CAP * math.tanh(score / CAP))


@cuda.jit(device=True, inline="always")
def _halve_query(q8, dim0, request, qo_head, qo_pos, params):
    for k in range(8):
        q8[k] *= float32(0.5)


@cuda.jit(device=True, inline="always")
def _add_position(o8, dim0, request, qo_head, qo_pos, params):
    for k in range(8):
        o8[k] += float32(qo_pos)


HOOKS = DecodeHooks(query_transform=_halve_query, logits_transform=_soft_cap, logits_mask=_window_mask,
                    output_transform=_add_position, name="test-window-softcap")  # fmt: skip


def hooked_reference(q, k, v, scale, qo_len, kv_len):
    """float64: halved q, soft-capped logits, causal + window mask, output + qo position."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double() * 0.5, k) * scale
    scores = CAP * torch.tanh(scores / CAP)
    qo_pos = torch.arange(qo_len)[:, None] + kv_len - qo_len
    kv_pos = torch.arange(kv_len)[None, :]
    scores = scores.masked_fill((kv_pos > qo_pos) | (qo_pos - kv_pos >= WINDOW), float("-inf"))
    out = torch.einsum("hnl,lhd->nhd", torch.softmax(scores, dim=-1), v)
    return out + qo_pos[:, :, None].double()


def test_variant_hooks_see_prefill_positions(device):
    rng = np.random.default_rng()
    settings = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float32",
                                  max_batch_size=4, max_num_pages=64, max_num_tokens=32, num_ctas=4)  # fmt: skip
    requests = [(7, 12), (1, 90)]  # the long decode request would split without the output hook
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, 4, 64, rng)
    cache = make_cache(settings, device, False)
    q = make_q(settings, 8, device)
    pre = tilegraph.BatchPrefill(settings, causal=True, device=device, hooks=HOOKS)
    plan = pre.plan(qo_indptr, kv_indptr, kv_indices, last)
    assert plan.num_merges > 0, "expected the 90-token request to be split (the merge applies the output hook)"
    out = pre.run(q, cache)
    kv_of = paged_kv_of(cache, settings, kv_indptr, kv_indices, requests)
    ref = torch.cat([hooked_reference(q[:7], *kv_of(0), settings.sm_scale, 7, 12),
                     hooked_reference(q[7:], *kv_of(1), settings.sm_scale, 1, 90)])  # fmt: skip
    assert relative_error(out, ref) < 1e-4

