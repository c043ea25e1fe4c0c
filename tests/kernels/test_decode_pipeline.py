"""The pipelined decode kernel (kernels.decode_pipeline): its division-free page arithmetic (above
2^31 words too), stage boundaries, and the NaN rules, through BatchDecode against float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import int64

import tilegraph
from tilegraph import variants
from tilegraph._device import cuda
from tilegraph.kernels import primitives as prim
from tilegraph.planner.layout import H_NUM_PAGES, H_PAGE_ERROR
from tilegraph.kernels.decode_pipeline import MAX_TOKEN, page_divisor, paged_word_offset, pipeline_config
from tilegraph.kernels.launch import launch
from tilegraph.serving.reference import decode_reference, relative_error

TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 1e-4}


def page_table(lengths, page_size, pool_pages, rng):
    counts = [-(-n // page_size) for n in lengths]
    pages = rng.permutation(pool_pages)[: sum(counts)].astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(n - 1) % page_size + 1 if n else 1 for n in lengths], dtype=np.int32)
    return torch.from_numpy(kv_indptr), torch.from_numpy(pages), torch.from_numpy(last)


def make_cache(settings, device):
    ps, hkv, hd, n = settings.page_size, settings.num_kv_heads, settings.head_dim, settings.max_num_pages
    inner = (ps, hkv, hd) if settings.kv_layout == "NHD" else (hkv, ps, hd)
    return torch.randn(n, 2, *inner).to(settings.torch_dtype).to(device)


def make_q(settings, batch, device):
    return torch.randn(batch, settings.num_qo_heads, settings.head_dim).to(settings.torch_dtype).to(device)


# ---- page arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [*range(1, 70), 96, 100, 127, 1000, 4095, 65537, 2**20 + 1, 2**30 + 3, MAX_TOKEN])
def test_page_divisor_is_exact_without_division(page_size):
    magic, shift = page_divisor(page_size)
    rng = np.random.default_rng(page_size)
    ts = [0, 1, page_size - 1, page_size, page_size + 1, MAX_TOKEN, MAX_TOKEN - 1, *rng.integers(0, MAX_TOKEN, 200).tolist()]
    for t in ts:
        if magic == 0:
            assert page_size == 1 << shift
            got = (t >> shift, t & (page_size - 1))
        else:
            assert t * magic < 2**63 and magic < 2**32  # fits the kernel's signed 64-bit multiply
            q = (t * magic) >> shift
            got = (q, t - q * page_size)
        assert got == divmod(t, page_size), (t, page_size)


def test_page_divisor_refuses_out_of_range():
    for bad in (0, -3, 2**31):
        with pytest.raises(ValueError, match="page_size"):
            page_divisor(bad)


def _offset_kernel(ts, kv_indices, page_size, magic, shift, page_stride, token_stride, head_offset, header, out):
    i = cuda.grid(1)
    if i < ts.shape[0]:
        out[i] = paged_word_offset(ts[i], int64(1), kv_indices, page_size, magic, shift, page_stride, token_stride,
                                   head_offset, header, 0)  # fmt: skip


@pytest.mark.parametrize("page_size", [16, 24])
def test_page_offsets_above_2_pow_31(page_size):
    """A pool of 65k pages x 32k words: page 65535's base is 2^31 words; in-page offsets stay int32."""
    hkv, hd = 32, 128
    page_stride, token_stride, head_stride = page_size * hkv * hd, hkv * hd, hd
    kv_indices = np.array([0, 65535, 3, 65534, 40000], dtype=np.int32)
    ts = np.arange(0, 4 * page_size, 5, dtype=np.int32)
    magic, shift = page_divisor(page_size)
    out = torch.zeros(len(ts), dtype=torch.int64)
    header = torch.zeros(8, dtype=torch.int32)
    header[H_NUM_PAGES] = 65536  # the page-id guard's pool bound: every id here is inside it
    head = 7
    kernel = cuda.jit(_offset_kernel)
    args = (torch.from_numpy(ts), torch.from_numpy(kv_indices), np.int32(page_size), np.int64(magic), np.int32(shift),
            np.int64(page_stride), np.int32(token_stride), np.int32(head * head_stride), header, out)  # fmt: skip
    launch("test.offsets", kernel, (1,), (32,), args)
    want = [int(kv_indices[1 + t // page_size]) * page_stride + (t % page_size) * token_stride + head * head_stride for t in ts.tolist()]
    assert max(want) > 2**31
    assert out.tolist() == want
    assert int(header[H_PAGE_ERROR]) == 0


# ---- stage boundaries ---------------------------------------------------------------------------


def _stage_tokens(settings) -> int:
    cfg = pipeline_config(prim.DTYPE_CODES[settings.dtype], settings.head_dim, settings.group_size)
    return cfg.stage_tokens


def _run(settings, lengths, device, variant=None, cache=None, q=None, rng=None):
    rng = rng or np.random.default_rng()
    kv_indptr, kv_indices, last = page_table(lengths, settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device) if cache is None else cache
    q = make_q(settings, len(lengths), device) if q is None else q
    dec = tilegraph.BatchDecode(settings, device=device, variant=variant)
    plan = dec.plan(kv_indptr, kv_indices, last)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)
    lse = dec.run(q, cache, out=out, return_lse=True)[1]
    return out, lse, plan, (q, cache, kv_indptr, kv_indices, last)


BOUNDARY_CASES = [
    # id, settings overrides, lengths as (stage multiple, offset)
    ("p1-g2-unsplit", dict(page_size=1, num_qo_heads=4, num_kv_heads=2, dtype="float16", num_ctas=1)),
    ("p3-g3-split", dict(page_size=3, num_qo_heads=3, num_kv_heads=1, dtype="bfloat16", num_ctas=8)),
    ("p5-g1-HND-split", dict(page_size=5, num_qo_heads=2, num_kv_heads=2, dtype="float32", kv_layout="HND", num_ctas=8)),
    # 2 head rows x 2 heads per thread, one score per lane (head_dim 32: 4 lanes), odd pages, split
    ("p7-g4-hd32-split", dict(page_size=7, num_qo_heads=4, num_kv_heads=1, dtype="bfloat16", head_dim=32, num_ctas=6)),
]  # fmt: skip


def _boundary_settings(overrides):
    return tilegraph.Settings(**{"head_dim": 16, "max_batch_size": 8, "max_num_pages": 160, **overrides})


@pytest.mark.parametrize("case", BOUNDARY_CASES, ids=[c[0] for c in BOUNDARY_CASES])
def test_stage_boundaries_match_reference(case, device):
    """kv_len = stage - 1, stage, stage + 1, 2 stages + 1, and split tiles that end mid-stage."""
    _, overrides = case
    settings = _boundary_settings(overrides)
    t = _stage_tokens(settings)
    _check_boundaries(settings, [t - 1, t, t + 1, 2 * t + 1, 1, 10 * t + 3], device)


def _check_boundaries(settings, lengths, device, require_split=True):
    out, lse, plan, (q, cache, kv_indptr, kv_indices, last) = _run(settings, lengths, device)
    ref_out, ref_lse = decode_reference(q, cache, settings, kv_indptr, kv_indices, last)
    assert relative_error(out, ref_out) < TOLERANCE[settings.dtype], plan
    assert relative_error(lse.cpu(), ref_lse) < 1e-4
    if settings.num_ctas > 1 and require_split:
        assert plan.num_merges > 0  # the split tiles exercise ends that are not stage multiples


SWEEP = [
    # page_size, group, head_dim, dtype: every lanes/heads-per-thread/scores-per-lane layout the shapes give
    (1, 1, 16, "float32"), (2, 3, 16, "bfloat16"), (3, 5, 32, "float16"), (5, 8, 48, "bfloat16"),
    (7, 2, 64, "float16"), (16, 4, 16, "float32"), (9, 6, 32, "bfloat16"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("page_size,group,head_dim,dtype", SWEEP)
def test_stage_boundary_sweep(page_size, group, head_dim, dtype, device):
    """kv_len = k * stage + {-1, 0, 1} for k = 1..3, page-aligned ends, split and unsplit."""
    for num_ctas in (1, 7):
        settings = _boundary_settings(dict(page_size=page_size, num_qo_heads=group, num_kv_heads=1, dtype=dtype,
                                           head_dim=head_dim, num_ctas=num_ctas))  # fmt: skip
        t = _stage_tokens(settings)
        lengths = [k * t + e for k in (1, 2, 3) for e in (-1, 0, 1)][:7] + [page_size]
        _check_boundaries(settings, lengths, device, require_split=False)


# ---- NaN rules ----------------------------------------------------------------------------------


def _nan_settings(**kw):
    base = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float32", max_batch_size=4,
                max_num_pages=32, num_ctas=1)  # fmt: skip
    return tilegraph.Settings(**{**base, **kw})


def test_nan_in_unused_tail_and_masked_positions_is_selected_out(device):
    """NaN K/V past kv_len in the last page and (with a window) before the window: finite outputs."""
    settings = _nan_settings()
    rng = np.random.default_rng()
    lengths = [6, 9]
    kv_indptr, kv_indices, last = page_table(lengths, 4, 32, rng)
    cache = make_cache(settings, device)
    for r, n in enumerate(lengths):  # poison the unused tail of each request's last page
        page = int(kv_indices[int(kv_indptr[r + 1]) - 1])
        cache[page, :, n % 4 :] = float("nan")
    first = int(kv_indices[int(kv_indptr[1])])  # request 1's first page: outside a window of 3
    cache[first, :, 0] = float("nan")
    q = make_q(settings, 2, device)
    dec = tilegraph.BatchDecode(settings, device=device, variant=variants.sliding_window(3))
    dec.plan(kv_indptr, kv_indices, last)
    out = dec.run(q, cache)
    assert torch.isfinite(out).all()


def test_nan_in_used_k_reaches_its_rows_only(device):
    settings = _nan_settings(num_ctas=4)
    rng = np.random.default_rng()
    lengths = [11, 7]
    kv_indptr, kv_indices, last = page_table(lengths, 4, 32, rng)
    cache = make_cache(settings, device)
    page = int(kv_indices[int(kv_indptr[0]) + 1])
    cache[page, 0, 2, 1] = float("nan")  # K of request 0, token 6, kv head 1
    q = make_q(settings, 2, device)
    dec = tilegraph.BatchDecode(settings, device=device)
    dec.plan(kv_indptr, kv_indices, last)
    out, lse = dec.run(q, cache, return_lse=True)
    assert torch.isnan(out[0, 2:]).all() and torch.isnan(lse[0, 2:]).all()  # the group of kv head 1
    assert torch.isfinite(out[0, :2]).all() and torch.isfinite(out[1]).all()
