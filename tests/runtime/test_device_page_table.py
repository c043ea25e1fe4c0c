"""Device-resident page tables: ``plan(..., page_table="device")`` (FlashInfer's CSR kv_indices left on
the device) and ``plan_block_table`` (vLLM's [rows, max_blocks] block table). The host reads only
lengths; the kernels read page ids in place and guard them. Every case runs with
Settings.debug_page_table (the guard word read after each step), fresh random data, poisoned outputs,
against float64 and against the host-array path on the same batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import PageTableError, PageTableMovedError
from tilegraph.errors import InputError
from tilegraph.serving.reference import attention_reference, decode_reference, gather_kv, relative_error

HKV, HQ, HD, PS, PAGES = 2, 4, 16, 4, 16


def settings(**extra):
    base = dict(num_qo_heads=HQ, num_kv_heads=HKV, head_dim=HD, page_size=PS, dtype="float16", max_batch_size=4,
                max_num_pages=PAGES, max_num_tokens=16, num_ctas=2, debug_page_table=True)  # fmt: skip
    return tilegraph.Settings(**{**base, **extra})


def csr(kv_lens, rng):
    pages = rng.permutation(PAGES).astype(np.int32)
    counts = [-(-n // PS) for n in kv_lens]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(n - 1) % PS + 1 if n else 0 for n in kv_lens], np.int32)
    return indptr, pages[: indptr[-1]], last


def block_table(indptr, indices, device, rows=None, cols=6, stride=9):
    """A [rows, cols] view (row stride ``stride``) of a larger tensor; unused entries hold ids far
    outside the pool, so reading one would trip the guard."""
    rows = rows or len(indptr) - 1
    backing = torch.full((rows, stride), 10 * PAGES, dtype=torch.int32)
    for r in range(len(indptr) - 1):
        ids = indices[indptr[r] : indptr[r + 1]]
        backing[r, : len(ids)] = torch.from_numpy(ids)
    return backing.to(device)[:, :cols]


def poisoned(q):
    return torch.full_like(q, float("nan"))


def cache_for(device):
    return torch.randn(PAGES, 2, PS, HKV, HD).half().to(device)


def test_decode_device_csr_and_block_table_match_host_and_float64(device):
    rng = np.random.default_rng()
    s = settings()
    cache = cache_for(device)
    kv_lens = [9, 1, 0, 14]
    indptr, indices, last = csr(kv_lens, rng)
    q = torch.randn(len(kv_lens), HQ, HD).half().to(device)
    ref, _ = decode_reference(q, cache, s, indptr, indices, last)
    dec = tilegraph.BatchDecode(s, device=device)
    dec.plan(indptr, indices, last)
    host = dec.run(q, cache, out=poisoned(q))
    dec.plan(indptr, torch.from_numpy(indices).to(device), last, page_table="device")
    dev = dec.run(q, cache, out=poisoned(q))
    bt = block_table(indptr, indices, device)
    assert bt.stride(0) != bt.shape[1]
    dec.plan_block_table(bt, np.array(kv_lens, np.int32))
    blocks = dec.run(q, cache, out=poisoned(q))
    assert relative_error(host, ref) < 4e-3
    assert torch.equal(dev, host) and torch.equal(blocks, host)  # same schedule, same kernel, same ids


def test_out_of_pool_id_reads_nothing_and_raises_naming_the_request(device):
    rng = np.random.default_rng()
    s = settings()
    cache = cache_for(device)
    kv_lens = [6, 7]
    indptr, indices, last = csr(kv_lens, rng)
    bt = block_table(indptr, indices, device)
    bt[1, 1] = PAGES + 3  # request 1's second page: outside the pool
    q = torch.randn(2, HQ, HD).half().to(device)
    dec = tilegraph.BatchDecode(s, device=device)
    dec.plan_block_table(bt, np.array(kv_lens, np.int32))
    out = poisoned(q)
    with pytest.raises(PageTableError, match="request 1") as err:
        dec.run(q, cache, out=out)
    assert err.value.request == 1
    ref, _ = decode_reference(q[:1], cache, s, indptr[:2], indices, last[:1])
    assert relative_error(out[:1], ref) < 4e-3  # the other request is untouched
    # the bad one read nothing and its refused tokens 4..6 are masked: attention over its first page only
    # (zero-filled but scored tokens would dilute the softmax with weights exp(0 - max))
    first_page = indices[indptr[1] : indptr[1] + 1]
    masked, _ = decode_reference(q[1:], cache, s, np.array([0, 1], np.int32), first_page, np.array([PS], np.int32))
    assert relative_error(out[1:], masked) < 4e-3
    dec.check_page_errors()  # the word was cleared with the raise
    # without the debug mode the step completes; the flag waits for check_page_errors()
    quiet = tilegraph.BatchDecode(settings().model_copy(update={"debug_page_table": False}), device=device)
    quiet.plan_block_table(bt, np.array(kv_lens, np.int32))
    quiet.run(q, cache, out=poisoned(q))
    with pytest.raises(PageTableError, match="request 1"):
        quiet.check_page_errors()


def test_prefill_device_page_tables_match_host_and_float64(device):
    rng = np.random.default_rng()
    s = settings()
    cache = cache_for(device)
    kv_lens, qo_lens = [7, 10], [3, 2]
    indptr, indices, last = csr(kv_lens, rng)
    qo_indptr = np.array([0, 3, 5], np.int32)
    q = torch.randn(5, HQ, HD).half().to(device)
    pre = tilegraph.BatchPrefill(s, causal=True, device=device)
    pre.plan(qo_indptr, indptr, indices, last)
    host = pre.run(q, cache, out=poisoned(q))
    pre.plan(qo_indptr, indptr, torch.from_numpy(indices).to(device), last, page_table="device")
    dev = pre.run(q, cache, out=poisoned(q))
    pre.plan_block_table(qo_indptr, block_table(indptr, indices, device), np.array(kv_lens, np.int32))
    blocks = pre.run(q, cache, out=poisoned(q))
    for r in range(2):
        k, v = gather_kv(cache, s, indices[indptr[r] : indptr[r + 1]], kv_lens[r])
        rows = slice(qo_indptr[r], qo_indptr[r + 1])
        want, _ = attention_reference(q[rows], k, v, s.sm_scale, causal_offset=kv_lens[r] - qo_lens[r])
        assert relative_error(host[rows], want) < 4e-3
    assert torch.equal(dev, host) and torch.equal(blocks, host)


@pytest.mark.parametrize("dtype", ["float16", "float32"])  # the tensor-core kernel, the CUDA-core kernel
def test_prefill_out_of_pool_id_raises_naming_the_request(device, dtype):
    rng = np.random.default_rng()
    s = settings(dtype=dtype)
    cache = cache_for(device).to(s.torch_dtype)
    kv_lens = [5, 6]
    indptr, indices, last = csr(kv_lens, rng)
    bad = torch.from_numpy(indices.copy())
    bad[0] = -4  # request 0's first page
    pre = tilegraph.BatchPrefill(s, causal=False, device=device)
    pre.plan(np.array([0, 1, 2], np.int32), indptr, bad.to(device), last, page_table="device")
    q = torch.randn(2, HQ, HD).to(s.torch_dtype).to(device)
    out = poisoned(q)
    with pytest.raises(PageTableError, match="request 0"):
        pre.run(q, cache, out=out)
    k, v = gather_kv(cache, s, indices[indptr[1] : indptr[2]], kv_lens[1])
    want, _ = attention_reference(q[1:], k, v, s.sm_scale)
    assert relative_error(out[1:], want) < 4e-3  # the other request is untouched
    # the bad one read nothing and its refused tokens 0..3 are masked: attention over token 4 alone
    k, v = gather_kv(cache, s, indices[indptr[0] : indptr[1]], kv_lens[0])
    masked, _ = attention_reference(q[:1], k[PS:], v[PS:], s.sm_scale)
    assert relative_error(out[:1], masked) < 4e-3


@pytest.mark.parametrize("kernel", ["decode", "prefill-float16", "prefill-float32"])
def test_refused_pages_mid_request_are_masked_across_many_stages(device, kernel):
    """A 22-token request whose 2nd and 4th pages are outside the pool: those 8 tokens are left out of
    the softmax (not scored as zeros), in stages past the first pipeline slots and across splits."""
    rng = np.random.default_rng()
    dtype = kernel.split("-")[1] if "-" in kernel else "float16"
    s = settings(dtype=dtype)
    cache = cache_for(device).to(s.torch_dtype)
    kv_lens = [22, 9]
    indptr, indices, last = csr(kv_lens, rng)
    bt = block_table(indptr, indices, device)
    bt[0, 1] = PAGES + 1
    bt[0, 3] = -2
    q = torch.randn(2, HQ, HD).to(s.torch_dtype).to(device)
    if kernel == "decode":
        runner = tilegraph.BatchDecode(s, device=device)
        runner.plan_block_table(bt, np.array(kv_lens, np.int32))
    else:
        runner = tilegraph.BatchPrefill(s, causal=False, device=device)
        runner.plan_block_table(np.array([0, 1, 2], np.int32), bt, np.array(kv_lens, np.int32))
    out = poisoned(q)
    with pytest.raises(PageTableError, match="request 0"):
        runner.run(q, cache, out=out)
    kept = [t for t in range(kv_lens[0]) if t // PS not in (1, 3)]
    k, v = gather_kv(cache, s, indices[indptr[0] : indptr[1]], kv_lens[0])
    want, _ = attention_reference(q[:1], k[kept], v[kept], s.sm_scale)
    assert relative_error(out[:1], want) < 4e-3
    k, v = gather_kv(cache, s, indices[indptr[1] : indptr[2]], kv_lens[1])
    want, _ = attention_reference(q[1:], k, v, s.sm_scale)
    assert relative_error(out[1:], want) < 4e-3


def test_device_page_table_arguments_are_checked_before_any_launch(device):
    s = settings()
    dec = tilegraph.BatchDecode(s, device=device)
    indptr, last = np.array([0, 2], np.int32), np.array([3], np.int32)
    with pytest.raises(InputError, match="kv_indices must be int32"):
        dec.plan(indptr, torch.zeros(2, dtype=torch.int64, device=device), last, page_table="device")
    with pytest.raises(InputError, match=r"kv_indptr\[-1\]=2 exceeds len\(kv_indices\)"):
        dec.plan(indptr, torch.zeros(1, dtype=torch.int32, device=device), last, page_table="device")
    with pytest.raises(InputError, match="page_table must be"):
        dec.plan(indptr, np.zeros(2, np.int32), last, page_table="gpu")
    with pytest.raises(InputError, match="block_table must be 2-D"):
        dec.plan_block_table(torch.zeros(4, dtype=torch.int32, device=device), np.array([3], np.int32))
    with pytest.raises(tilegraph.PlanError, match="needs 3 pages, more than block_table has columns"):
        dec.plan_block_table(torch.zeros(1, 2, dtype=torch.int32, device=device), np.array([9], np.int32))
    with pytest.raises(InputError, match=r"seq_lens\[0\]=-1"):
        dec.plan_block_table(torch.zeros(1, 2, dtype=torch.int32, device=device), np.array([-1], np.int32))
    with pytest.raises(InputError, match="block_table row 1"):
        dec.plan_block_table(torch.zeros(1, 2, dtype=torch.int32, device=device), np.array([1, 1], np.int32))
    assert dec.current_plan is None  # nothing was planned


def test_graph_replay_refuses_another_page_table_tensor(device):
    rng = np.random.default_rng()
    s = settings(graphs={"batch_sizes": [2]})
    cache = cache_for(device)
    dec = tilegraph.BatchDecode(s, device=device)
    table = torch.zeros(4, 6, dtype=torch.int32, device=device)  # the engine's fixed block table

    def forward(inputs):
        return dec.run(inputs["q"], cache)

    kv_lens = [5, 8]
    indptr, indices, _ = csr(kv_lens, rng)
    table[:2] = block_table(indptr, indices, device, cols=6, stride=6)
    dec.plan_block_table(table, np.array(kv_lens, np.int32))  # binds the table before capture
    runner = tilegraph.GraphRunner(forward, {"q": torch.zeros(1, HQ, HD, dtype=torch.float16, device=device)},
                                   attention=dec)  # fmt: skip
    runner.capture_all(show_progress=False)
    q = torch.randn(2, HQ, HD).half().to(device)
    out = runner.step({"q": q}, lambda n: dec.plan_block_table(table, np.array(kv_lens, np.int32), padded_batch_size=n),
                      copy=True)  # fmt: skip
    last = np.array([(n - 1) % PS + 1 for n in kv_lens], np.int32)
    assert relative_error(out, decode_reference(q, cache, s, indptr, indices, last)[0]) < 4e-3
    other = table.clone()
    with pytest.raises(PageTableMovedError, match="captured reading"):
        runner.step({"q": q}, lambda n: dec.plan_block_table(other, np.array(kv_lens, np.int32), padded_batch_size=n))


def test_capture_stand_ins_keep_the_bound_device_table(device):
    """graph_prepare_capture after a device plan plans requests without KV over the same tensor, so
    the capture binds its address (no kernel runs here)."""
    s = settings()
    table = torch.zeros(4, 6, dtype=torch.int32, device=device)
    csr_ids = torch.zeros(8, dtype=torch.int32, device=device)
    dec = tilegraph.BatchDecode(s, device=device)
    dec.plan(np.array([0, 2], np.int32), csr_ids, np.array([1], np.int32), page_table="device")
    dec.graph_prepare_capture(3)
    assert dec.graph_plan_state().page_table_address == csr_ids.data_ptr() and dec.page_table is csr_ids
    assert dec.current_plan.kv_len[:3].tolist() == [0, 0, 0]
    pre = tilegraph.BatchPrefill(s, causal=True, device=device)
    pre.plan_block_table(np.array([0, 2], np.int32), table, np.array([5], np.int32))
    pre.graph_prepare_capture(4)
    state = pre.graph_plan_state()
    assert state.page_table_address == table.data_ptr() and state.padded_batch_size == 4
    assert pre.current_plan.page_table == "block_table" and pre.current_plan.section("kv_len")[:1].tolist() == [0]
    pre.plan(np.array([0, 1], np.int32), np.array([0, 1], np.int32), np.zeros(1, np.int32), np.array([1], np.int32))
    assert pre.graph_plan_state().page_table_address == 0 and pre.page_table is None  # back on the host path


def test_guard_bound_is_the_cache_run_on_when_smaller_than_settings(device):
    """A cache of 10 pages under Settings.max_num_pages=16: id 12 is inside Settings but outside the
    cache, so the guard (bounded by the cache at run time) leaves it out and names the request."""
    rng = np.random.default_rng()
    s = settings()
    cache = cache_for(device)[:10]
    ids = rng.permutation(10)[:3].astype(np.int32)
    indptr, last = np.array([0, 2, 3], np.int32), np.array([1, 3], np.int32)  # kv lengths 5 and 3
    table = torch.from_numpy(ids.copy())
    q = torch.randn(2, HQ, HD).half().to(device)
    dec = tilegraph.BatchDecode(s, device=device)
    dec.plan(indptr, table.to(device), last, page_table="device")
    out = dec.run(q, cache, out=poisoned(q))
    assert relative_error(out, decode_reference(q, cache, s, indptr, ids, last)[0]) < 4e-3
    table[2] = 12
    dec.plan(indptr, table.to(device), last, page_table="device")
    with pytest.raises(PageTableError, match=r"request 1: .*num_pages=10\)"):
        dec.run(q, cache, out=poisoned(q))
    full = torch.cat([cache, cache_for(device)[10:]])  # the same plan on a 16-page cache: id 12 is inside it
    out = dec.run(q, full, out=poisoned(q))
    ids[2] = 12
    assert relative_error(out, decode_reference(q, full, s, indptr, ids, last)[0]) < 4e-3
