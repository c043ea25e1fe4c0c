"""BatchDecode on the simulator (or a GPU) against the float64 reference: a covering set of cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.serving.reference import decode_reference, relative_error

TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 1e-4}


def page_table(lengths, page_size, pool_pages, rng):
    """Random distinct pages from the pool for each request; last_page_len garbage for empty requests."""
    counts = [-(-n // page_size) for n in lengths]
    pages = rng.permutation(pool_pages)[: sum(counts)].astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(n - 1) % page_size + 1 if n else rng.integers(0, 99) for n in lengths], dtype=np.int32)
    return torch.from_numpy(kv_indptr), torch.from_numpy(pages), torch.from_numpy(last)


def make_cache(settings, device, pair):
    ps, hkv, hd, n = settings.page_size, settings.num_kv_heads, settings.head_dim, settings.max_num_pages
    inner = (ps, hkv, hd) if settings.kv_layout == "NHD" else (hkv, ps, hd)
    if pair:
        return tuple(torch.randn(n, *inner).to(settings.torch_dtype).to(device) for _ in range(2))
    return torch.randn(n, 2, *inner).to(settings.torch_dtype).to(device)


def make_q(settings, batch, device, strided):
    hq, hd = settings.num_qo_heads, settings.head_dim
    if not strided:
        return torch.randn(batch, hq, hd).to(settings.torch_dtype).to(device)
    # q sliced out of a fused QKV projection: row stride (hq + 2 * hkv) * hd
    hkv = settings.num_kv_heads
    qkv = torch.randn(batch, (hq + 2 * hkv) * hd).to(settings.torch_dtype).to(device)
    q = qkv[:, : hq * hd].view(batch, hq, hd)
    assert not q.is_contiguous()
    return q


CASES = [
    # id, settings overrides, lengths, pair cache, strided q, out=, return_lse
    ("f16-NHD-g2-unsplit", dict(num_qo_heads=4, num_kv_heads=2, head_dim=32, page_size=16, dtype="float16",
                                num_ctas=1), [0, 1, 15, 16, 17, 33], False, False, False, True),
    ("bf16-HND-g3-split-p1", dict(num_qo_heads=6, num_kv_heads=2, head_dim=16, page_size=1, dtype="bfloat16",
                                  kv_layout="HND", num_ctas=6), [23, 2, 9], False, False, True, True),
    ("f32-NHD-g4-pair-strided-p5", dict(num_qo_heads=4, num_kv_heads=1, head_dim=32, page_size=5, dtype="float32",
                                        num_ctas=3), [4, 5, 6, 21], True, True, False, False),
    ("bf16-NHD-g6-two-passes-split", dict(num_qo_heads=6, num_kv_heads=1, head_dim=16, page_size=3, dtype="bfloat16",
                                          num_ctas=3), [14, 1, 0], False, False, False, True),
    ("f16-HND-g1-pair-split", dict(num_qo_heads=2, num_kv_heads=2, head_dim=48, page_size=16, dtype="float16",
                                   kv_layout="HND", num_ctas=5), [31, 1], True, False, True, True),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_matches_reference(case, device):
    _, overrides, lengths, pair, strided, use_out, return_lse = case
    rng = np.random.default_rng()
    settings = tilegraph.Settings(max_batch_size=8, max_num_pages=64, **overrides)
    kv_indptr, kv_indices, last = page_table(lengths, settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device, pair)
    q = make_q(settings, len(lengths), device, strided)
    dec = tilegraph.BatchDecode(settings, device=device)
    plan = dec.plan(kv_indptr, kv_indices, last)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device) if use_out else None
    result = dec.run(q, cache, out=out, return_lse=return_lse)
    got, lse = result if return_lse else (result, None)
    if use_out:
        assert got.data_ptr() == out.data_ptr()
    ref_out, ref_lse = decode_reference(q, cache, settings, kv_indptr, kv_indices, last)
    assert relative_error(got, ref_out) < TOLERANCE[settings.dtype], plan
    if return_lse:
        finite = torch.isfinite(ref_lse)
        assert relative_error(lse.cpu()[finite], ref_lse[finite]) < 1e-4
        assert torch.isneginf(lse.cpu()[~finite]).all()
    empty = torch.tensor([n == 0 for n in lengths])
    assert (got.cpu()[empty] == 0).all()


def test_forced_split_and_unsplit_agree(device):
    """The same batch planned over 1 CTA (no split) and over many (split) gives the same answer."""
    rng = np.random.default_rng()
    base = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float32", max_batch_size=4, max_num_pages=32)
    lengths = [29, 3]
    kv_indptr, kv_indices, last = page_table(lengths, 4, 32, rng)
    cache = make_cache(tilegraph.Settings(**base), device, False)
    q = make_q(tilegraph.Settings(**base), 2, device, False)
    outs = []
    for num_ctas in (1, 8):
        dec = tilegraph.BatchDecode(tilegraph.Settings(num_ctas=num_ctas, **base), device=device)
        plan = dec.plan(kv_indptr, kv_indices, last)
        outs.append((plan.num_merges, dec.run(q, cache)))
    assert outs[0][0] == 0 and outs[1][0] > 0, "expected no split on 1 CTA and a split on 8"
    assert relative_error(outs[1][1], outs[0][1].double()) < 1e-5


def test_deterministic_output_independent_of_batch(device):
    """deterministic=True: a request's output is bitwise identical whatever else is batched with it."""
    rng = np.random.default_rng()
    settings = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=8, dtype="float16",
                                  max_batch_size=4, max_num_pages=256, num_ctas=4, deterministic=True)  # fmt: skip
    cache = make_cache(settings, device, False)
    q0 = make_q(settings, 1, device, False)
    dec = tilegraph.BatchDecode(settings, device=device)
    kv_indptr, kv_indices, last = page_table([700], 8, 256, rng)
    alone = dec.run(q0, cache) if dec.plan(kv_indptr, kv_indices, last) else None
    # the same pages for request 0, plus a companion request with other pages
    companion_pages = torch.tensor(sorted(set(range(256)) - set(kv_indices.tolist()))[:3], dtype=torch.int32)
    kv_indptr2 = torch.tensor([0, len(kv_indices), len(kv_indices) + 3], dtype=torch.int32)
    kv_indices2 = torch.cat([kv_indices, companion_pages])
    last2 = torch.tensor([int(last[0]), 5], dtype=torch.int32)
    q = torch.cat([q0, make_q(settings, 1, device, False)])
    dec.plan(kv_indptr2, kv_indices2, last2)
    together = dec.run(q, cache)
    assert torch.equal(alone[0], together[0])
