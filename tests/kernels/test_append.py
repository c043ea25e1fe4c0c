"""append_kv on the simulator (or a GPU) against a float64 numpy reference, and its bad-input errors.

The cache starts random with every page of the step's requests poisoned (NaN): a slot the kernel
should write but does not stays NaN, a slot it should not write changes -- both fail the
comparison, which is exact (a copy is bitwise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.append import append_kv
from tilegraph.errors import DeviceError, InputError
from tilegraph.page_pool import PagePool


def make_settings(**overrides) -> tilegraph.Settings:
    base = dict(num_qo_heads=2, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16", max_num_pages=24)
    return tilegraph.Settings(**{**base, **overrides})


def make_cache(settings, device, pair):
    """Random cache: a 5-D tensor or a (k_cache, v_cache) pair, in the Settings layout."""
    ps, hkv, hd, n = settings.page_size, settings.num_kv_heads, settings.head_dim, settings.max_num_pages
    inner = (ps, hkv, hd) if settings.kv_layout == "NHD" else (hkv, ps, hd)
    if pair:
        return tuple(torch.randn(n, *inner).to(settings.torch_dtype).to(device) for _ in range(2))
    return torch.randn(n, 2, *inner).to(settings.torch_dtype).to(device)


def cache_planes(cache, settings) -> tuple[np.ndarray, np.ndarray]:
    """K and V as float64 numpy [num_pages, page_size, num_kv_heads, head_dim] (copies)."""
    k, v = (cache[0], cache[1]) if isinstance(cache, tuple) else (cache[:, 0], cache[:, 1])
    if settings.kv_layout == "HND":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    return k.double().cpu().numpy().copy(), v.double().cpu().numpy().copy()


def poison_pages(cache, pages, settings) -> None:
    for t in cache if isinstance(cache, tuple) else (cache,):
        t[torch.as_tensor(pages, dtype=torch.long)] = float("nan")


def scenario(rng, settings, num_requests, max_new, num_padding):
    """Requests with random existing lengths (0 included) growing by 1..max_new tokens; a shuffled
    row order with padded rows (-1) mixed in. Pages of each request: random, distinct."""
    ps = settings.page_size
    old = rng.integers(0, 3 * ps + 2, size=num_requests)
    old[0] = 0
    new = rng.integers(1, max_new + 1, size=num_requests)
    counts = -(-(old + new) // ps)
    pages = rng.permutation(settings.max_num_pages)[: counts.sum()].astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    batch = np.concatenate([np.full(n, b) for b, n in enumerate(new)] + [np.full(num_padding, -1)])
    pos = np.concatenate([np.arange(o, o + n) for o, n in zip(old, new)] + [rng.integers(0, ps, num_padding)])
    order = rng.permutation(batch.shape[0])
    return batch[order].astype(np.int32), pos[order].astype(np.int32), kv_indptr, pages


def make_rows(settings, nnz, device, fused):
    """k, v [nnz, Hkv, D]: contiguous, or strided slices of one fused QKV projection output."""
    hq, hkv, hd = settings.num_qo_heads, settings.num_kv_heads, settings.head_dim
    if not fused:
        return tuple(torch.randn(nnz, hkv, hd).to(settings.torch_dtype).to(device) for _ in range(2))
    qkv = torch.randn(nnz, (hq + 2 * hkv) * hd).to(settings.torch_dtype).to(device)
    k = qkv[:, hq * hd : (hq + hkv) * hd].view(nnz, hkv, hd)
    v = qkv[:, (hq + hkv) * hd :].view(nnz, hkv, hd)
    assert not k.is_contiguous()
    return k, v


def reference(k_before, v_before, k, v, batch, pos, kv_indptr, kv_indices, page_size):
    """Float64 planes after the append: row i to page kv_indices[kv_indptr[b] + p // ps], slot p % ps."""
    k_ref, v_ref = k_before.copy(), v_before.copy()
    k64, v64 = k.double().cpu().numpy(), v.double().cpu().numpy()
    for i, (b, p) in enumerate(zip(batch.tolist(), pos.tolist())):
        if b < 0:
            continue
        page = kv_indices[kv_indptr[b] + p // page_size]
        k_ref[page, p % page_size] = k64[i]
        v_ref[page, p % page_size] = v64[i]
    return k_ref, v_ref


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    mismatch = ~((got == want) | (np.isnan(got) & np.isnan(want)))
    assert not mismatch.any(), f"{mismatch.sum()} elements differ, first at {np.argwhere(mismatch)[0].tolist()}"


def as_index(a, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)


CASES = [
    # id, settings overrides, pair cache, fused (strided) k/v
    ("f16-NHD-p4", dict(dtype="float16"), False, False),
    ("f16-HND-p1-pair", dict(dtype="float16", kv_layout="HND", page_size=1), True, False),
    ("f16-NHD-p3-pair-fused-hd48", dict(dtype="float16", page_size=3, head_dim=48), True, True),
    ("f16-HND-p5-fused", dict(dtype="float16", kv_layout="HND", page_size=5), False, True),
    ("bf16-NHD-p1", dict(dtype="bfloat16", page_size=1, num_kv_heads=1), False, False),
    ("bf16-HND-p3-fused", dict(dtype="bfloat16", kv_layout="HND", page_size=3), False, True),
    ("bf16-NHD-p5-pair", dict(dtype="bfloat16", page_size=5, head_dim=32), True, False),
    ("bf16-HND-p4-pair", dict(dtype="bfloat16", kv_layout="HND", num_kv_heads=3, num_qo_heads=3), True, False),
    ("f32-NHD-p3-fused", dict(dtype="float32", page_size=3), False, True),
    ("f32-HND-p4", dict(dtype="float32", kv_layout="HND"), False, False),
    ("f32-NHD-p1-pair", dict(dtype="float32", page_size=1, head_dim=32), True, False),
    ("f32-HND-p5-pair-fused", dict(dtype="float32", kv_layout="HND", page_size=5), True, True),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_append_matches_reference(case, device):
    _, overrides, pair, fused = case
    rng = np.random.default_rng()
    settings = make_settings(**overrides)
    batch, pos, kv_indptr, kv_indices = scenario(rng, settings, num_requests=3, max_new=settings.page_size + 2, num_padding=2)
    cache = make_cache(settings, device, pair)
    poison_pages(cache, kv_indices, settings)
    k, v = make_rows(settings, batch.shape[0], device, fused)
    k_before, v_before = cache_planes(cache, settings)
    k_ref, v_ref = reference(k_before, v_before, k, v, batch, pos, kv_indptr, kv_indices, settings.page_size)

    append_kv(k, v, cache, as_index(batch, device), as_index(pos, device), as_index(kv_indptr, device),
              as_index(kv_indices, device), settings)  # fmt: skip

    k_got, v_got = cache_planes(cache, settings)
    assert_same(k_got, k_ref)
    assert_same(v_got, v_ref)


def test_out_of_range_rows_are_skipped_by_the_kernel(device):
    """With the host value checks off (as on a GPU), every row aimed outside its request's pages
    writes nothing -- even where the unchecked address would be another request's page -- and the
    valid rows still land."""
    settings = make_settings(page_size=2, max_num_pages=8)
    # requests 0, 1 own pages 5, 3; request 2's page 9 is outside the cache; request 3's entries
    # lie past the end of kv_indices (a malformed table)
    kv_indptr = np.array([0, 1, 2, 3, 5], np.int32)
    kv_indices = np.array([5, 3, 9], np.int32)
    rows = [  # (batch index, position, lands?)
        (0, 1, True),
        (0, 3, False),  # past request 0's single page (unchecked: request 1's page 3, slot 1)
        (1, -1, False),  # negative position (unchecked: request 0's page 5, slot 1)
        (4, 0, False),  # request beyond the page table
        (3, 0, False),  # page-table entry beyond kv_indices
        (2, 0, False),  # page index outside the cache
        (-1, 0, False),  # padding
        (-4, 1, False),  # padding too (unchecked: kv_indptr[-4:-3] is request 1's page 3, slot 1)
        (1, 0, True),
    ]
    batch = np.array([r[0] for r in rows], np.int32)
    pos = np.array([r[1] for r in rows], np.int32)
    valid = np.array([r[2] for r in rows])
    cache = make_cache(settings, device, pair=False)
    poison_pages(cache, [3, 5], settings)
    k, v = make_rows(settings, len(rows), device, fused=False)
    k_before, v_before = cache_planes(cache, settings)
    k_ref, v_ref = reference(k_before, v_before, k[valid], v[valid], batch[valid], pos[valid], kv_indptr, kv_indices, 2)

    append_kv(k, v, cache, as_index(batch, device), as_index(pos, device), as_index(kv_indptr, device),
              as_index(kv_indices, device), settings, check_values=False)  # fmt: skip

    k_got, v_got = cache_planes(cache, settings)
    assert_same(k_got, k_ref)
    assert_same(v_got, v_ref)


def test_page_pool_step_then_append(device):
    """PagePool's step indices and page table drive append_kv: two steps, a bucket's padding rows."""
    settings = make_settings(page_size=3, max_num_pages=10)
    pool = PagePool(settings)
    cache = make_cache(settings, device, pair=False)
    poison_pages(cache, range(settings.max_num_pages), settings)
    k_ref, v_ref = cache_planes(cache, settings)  # all NaN
    for request_ids, counts in (([10, 11], [4, 2]), ([11, 10, 12], [1, 3, 5])):
        step = pool.allocate_step(request_ids, counts, pad_to=sum(counts) + 2)
        table = pool.page_table(request_ids)
        k, v = make_rows(settings, step.batch_indices.shape[0], device, fused=False)
        append_kv(k, v, cache, as_index(step.batch_indices, device), as_index(step.positions, device),
                  as_index(table.kv_indptr, device), as_index(table.kv_indices, device), settings)  # fmt: skip
        for i, (b, p) in enumerate(zip(step.batch_indices.tolist(), step.positions.tolist())):
            if b >= 0:
                page = pool.pages(request_ids[b])[p // 3]
                k_ref[page, p % 3] = k[i].double().cpu().numpy()
                v_ref[page, p % 3] = v[i].double().cpu().numpy()
    assert [pool.kv_len(r) for r in (10, 11, 12)] == [7, 3, 5]
    k_got, v_got = cache_planes(cache, settings)
    assert_same(k_got, k_ref)
    assert_same(v_got, v_ref)


def test_captured_append_replays_with_refilled_buffers(device):
    """Captured once with a bucket of padding rows, replayed after the fixed index and k/v buffers
    are refilled in place: the replay writes the new rows (the launch reads the buffers, not
    values frozen at capture). On a GPU the same discipline holds for a torch CUDA graph."""
    if device.type != "cpu":
        pytest.skip("uses the simulator's graph stand-in")
    from tilegraph.graphs.standin import SimulatedGraph

    settings = make_settings(dtype="bfloat16", kv_layout="HND", page_size=3)
    rng = np.random.default_rng()
    batch, pos, kv_indptr, kv_indices = scenario(rng, settings, num_requests=2, max_new=4, num_padding=1)
    nnz = batch.shape[0]
    static = dict(
        batch_indices=as_index(np.full(nnz, -1), device),
        positions=as_index(np.zeros(nnz), device),
        kv_indptr=as_index(np.zeros(kv_indptr.shape[0]), device),
        kv_indices=as_index(np.zeros(kv_indices.shape[0]), device),
    )
    k_static, v_static = make_rows(settings, nnz, device, fused=True)
    cache = make_cache(settings, device, pair=False)
    poison_pages(cache, kv_indices, settings)
    graph = SimulatedGraph()
    with graph.capture():
        append_kv(k_static, v_static, cache, **static, settings=settings, check_values=False)
    assert graph.num_kernel_launches == 1

    k, v = make_rows(settings, nnz, device, fused=False)
    k_before, v_before = cache_planes(cache, settings)
    k_ref, v_ref = reference(k_before, v_before, k, v, batch, pos, kv_indptr, kv_indices, settings.page_size)
    for name, values in (("batch_indices", batch), ("positions", pos), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices)):
        static[name].copy_(as_index(values, device))
    k_static.copy_(k)
    v_static.copy_(v)
    graph.replay()

    k_got, v_got = cache_planes(cache, settings)
    assert_same(k_got, k_ref)
    assert_same(v_got, v_ref)


def test_empty_step_launches_nothing(device):
    settings = make_settings()
    cache = make_cache(settings, device, pair=False)
    before = cache.clone()
    empty = torch.empty(0, 2, 16).half().to(device)
    none = as_index(np.zeros(0), device)
    append_kv(empty, empty, cache, none, none, as_index([0, 1], device), as_index([3], device), settings)
    assert torch.equal(cache.view(torch.int16), before.view(torch.int16))


# ---- bad input: InputError naming the argument, raised before any launch --------------------------

ERR_SETTINGS = make_settings(page_size=4, max_num_pages=8)


@pytest.fixture
def good(device):
    """Valid arguments for a 3-row append (2 requests) and a poisoned cache."""
    hkv, hd = 2, 16
    args = dict(
        k=torch.randn(3, hkv, hd).half().to(device),
        v=torch.randn(3, hkv, hd).half().to(device),
        kv_cache=torch.full((8, 2, 4, hkv, hd), float("nan")).half().to(device),
        batch_indices=as_index([0, 1, 1], device),
        positions=as_index([4, 0, 1], device),
        kv_indptr=as_index([0, 2, 3], device),
        kv_indices=as_index([6, 1, 3], device),
    )
    return args


def _misaligned(t):
    flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    return flat[1:].view(t.shape).copy_(t)


BAD = [
    ("k", lambda a: a["k"].float(), "k has dtype"),
    ("k", lambda a: a["k"][0], r"k must be \[nnz"),
    ("k", lambda a: a["k"][:, :1], "num_kv_heads=2"),
    ("k", lambda a: a["k"].cpu().numpy(), "k must be a torch.Tensor"),
    ("v", lambda a: a["v"][:2], "v shape"),
    ("v", lambda a: a["v"].transpose(1, 2).contiguous().transpose(1, 2), "v's last dimension"),
    ("v", lambda a: _misaligned(a["v"]), "v must be 16-byte aligned"),
    ("k", lambda a: torch.randn(3, 2, 20).half().to(a["k"].device)[:, :, :16], "k must be 16-byte aligned"),
    ("kv_cache", lambda a: a["kv_cache"][:, :, :2].contiguous(), "kv_cache shape"),
    ("kv_cache", lambda a: (a["kv_cache"][:, 0].contiguous(),), "pair"),
    ("kv_cache", lambda a: a["kv_cache"].float(), "kv_cache has dtype"),
    ("batch_indices", lambda a: a["batch_indices"].long(), "batch_indices must be int32"),
    ("batch_indices", lambda a: a["batch_indices"][:2], "batch_indices has 2 entries"),
    ("batch_indices", lambda a: a["batch_indices"].cpu().numpy(), "batch_indices must be an int32 torch.Tensor"),
    ("positions", lambda a: torch.stack([a["positions"]] * 2, 1)[:, 0], "positions must be a contiguous 1-D"),
    ("positions", lambda a: a["positions"][None], "positions must be a contiguous 1-D"),
    ("kv_indptr", lambda a: a["kv_indptr"].long(), "kv_indptr must be int32"),
    ("kv_indptr", lambda a: a["kv_indptr"][:0], "kv_indptr must have B"),
    ("kv_indices", lambda a: a["kv_indices"].to(torch.int16), "kv_indices must be int32"),
]  # fmt: skip


# index contents: checked on the host for CPU tensors only (the simulator path)
BAD_CONTENTS = [
    ("batch_indices", [0, 2, 1], r"batch_indices\[1\]=2 .* B=2"),
    ("positions", [8, 0, 1], r"positions\[0\]=8 needs page 2 of request 0, which has 2 pages"),
    ("positions", [4, -1, 1], r"positions\[1\]=-1 is negative"),
    ("positions", [4, 1, 1], r"rows \[1, 2\] .* same cache slot"),
    ("kv_indptr", [0, 3, 2], "non-decreasing"),
    ("kv_indptr", [0, 2, 4], "at most len\\(kv_indices\\)=3"),
    ("kv_indices", [6, 1, 8], r"kv_indices\[2\]=8 is outside the cache's 8 pages"),
]  # fmt: skip


def _checked(good, name, value, match):
    cache = good["kv_cache"]
    args = {**good, name: value}
    with pytest.raises(InputError, match=match):
        append_kv(**args, settings=ERR_SETTINGS)
    assert torch.isnan(cache).all(), "the cache was written although the call failed"


@pytest.mark.parametrize("name, mutate, match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_before_launch(good, name, mutate, match):
    _checked(good, name, mutate(good), match)


@pytest.mark.parametrize("name, values, match", BAD_CONTENTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_CONTENTS)])
def test_bad_contents_raise_on_cpu(good, device, name, values, match):
    if device.type != "cpu":
        pytest.skip("index contents are checked on the host only for CPU tensors")
    _checked(good, name, as_index(values, device), match)


def test_valid_fixture_appends(good):
    """The error tests' base arguments are valid: without a mutation they write the cache."""
    append_kv(**good, settings=ERR_SETTINGS)
    cache = good["kv_cache"].cpu()
    assert torch.equal(cache[1, 0, 0], good["k"][0].cpu())  # row 0: request 0, position 4
    assert torch.equal(cache[3, 1, 1], good["v"][2].cpu())  # row 2: request 1, position 1


def test_wrong_device_names_the_argument(good):
    if tilegraph.SIMULATOR:
        with pytest.raises(DeviceError, match="simulator"):
            append_kv(**good, settings=ERR_SETTINGS, device="cuda")
    else:
        _checked(good, "positions", good["positions"].cpu(), "positions is on cpu, but index arrays must be on the kernel.s device")
