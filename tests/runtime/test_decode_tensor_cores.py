"""BatchDecode's tensor-core engine (one-token prefill plans on the tensor-core prefill kernel) against
the float64 reference: engine choice, page-table kinds, splits, stage boundaries, groups past 16
rows, graph replay. The CUDA-core engine's cases live in test_decode.py."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch

import tilegraph
from tilegraph.decode import decode_engine_of, workspace_nbytes
from tilegraph.planner.plan import Plan
from tilegraph.planner.prefill import PrefillPlan
from tilegraph.serving.reference import decode_reference, relative_error

from .test_decode import make_cache, page_table

# P is rounded to the input dtype for the P.V mma (fp32 accumulation): fp16 ~1e-3, bf16 ~8e-3
TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2}


def check_against_reference(settings, q, cache, table, got, lse, plan):
    ref_out, ref_lse = decode_reference(q, cache, settings, *table)
    assert relative_error(got, ref_out) < TOLERANCE[settings.dtype], plan
    finite = torch.isfinite(ref_lse)
    assert relative_error(lse.cpu()[finite], ref_lse[finite]) < 1e-4, plan
    assert torch.isneginf(lse.cpu()[~finite]).all()


# ---- which engine runs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, engine",
    [
        (dict(num_qo_heads=4, num_kv_heads=1, dtype="float16"), "cuda_cores"),  # g4: the table keeps CUDA cores
        (dict(num_qo_heads=8, num_kv_heads=1, dtype="float16"), "tensor_cores"),  # g8
        (dict(num_qo_heads=40, num_kv_heads=2, dtype="bfloat16"), "tensor_cores"),  # g20
        (dict(num_qo_heads=8, num_kv_heads=1, dtype="float32"), "cuda_cores"),  # no mma inputs
        (dict(num_qo_heads=8, num_kv_heads=1, dtype="float16", decode_engine="cuda_cores"), "cuda_cores"),
        (dict(num_qo_heads=2, num_kv_heads=2, dtype="bfloat16", decode_engine="tensor_cores"), "tensor_cores"),
    ],
)  # fmt: skip
def test_engine_choice(overrides, engine):
    settings = tilegraph.Settings(head_dim=32, max_batch_size=4, max_num_pages=8, num_ctas=2, **overrides)
    dec = tilegraph.BatchDecode(settings, device="cpu")
    assert decode_engine_of(settings) == dec.engine == engine
    plan = dec.plan(*page_table([5, 0], settings.page_size, settings.max_num_pages, np.random.default_rng()))
    assert isinstance(plan, PrefillPlan if engine == "tensor_cores" else Plan)
    assert workspace_nbytes(settings, "cpu") == dec.workspace_nbytes


def test_tensor_cores_refuse_float32():
    with pytest.raises(pydantic.ValidationError, match="decode_engine"):
        tilegraph.Settings(num_qo_heads=8, num_kv_heads=1, head_dim=32, dtype="float32", decode_engine="tensor_cores")


# ---- against the float64 reference ------------------------------------------------------------------

CASES = [
    # id, settings overrides, lengths, pair cache, strided q
    # 16-token stages on the simulator: 15/16/17 and 31/32/33 straddle them; 40 splits over 4 CTAs
    ("f16-NHD-g8-split", dict(num_qo_heads=8, num_kv_heads=1, head_dim=32, page_size=16, dtype="float16",
                              num_ctas=4), [0, 1, 15, 16, 17, 40], False, False),
    ("bf16-HND-g6-p1-pair", dict(num_qo_heads=12, num_kv_heads=2, head_dim=16, page_size=1, dtype="bfloat16",
                                 kv_layout="HND", num_ctas=3), [31, 2, 17], True, False),
    ("f16-NHD-g5-p5-strided", dict(num_qo_heads=10, num_kv_heads=2, head_dim=48, page_size=5, dtype="float16",
                                   num_ctas=2), [4, 5, 6, 32], False, True),
    ("bf16-NHD-g20-passes", dict(num_qo_heads=20, num_kv_heads=1, head_dim=16, page_size=4, dtype="bfloat16",
                                 num_ctas=3), [19, 0, 3], False, False),
    ("f16-NHD-g2-forced", dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=3, dtype="float16",
                               num_ctas=2, decode_engine="tensor_cores"), [7, 18], True, False),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case, device):
    _, overrides, lengths, pair, strided = case
    rng = np.random.default_rng()
    settings = tilegraph.Settings(max_batch_size=8, max_num_pages=64, **overrides)
    table = page_table(lengths, settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device, pair)
    hq, hkv, hd = settings.num_qo_heads, settings.num_kv_heads, settings.head_dim
    if strided:  # q sliced out of a fused QKV projection
        q = torch.randn(len(lengths), (hq + 2 * hkv) * hd).to(settings.torch_dtype).to(device)[:, : hq * hd].view(-1, hq, hd)
    else:
        q = torch.randn(len(lengths), hq, hd).to(settings.torch_dtype).to(device)
    dec = tilegraph.BatchDecode(settings, device=device)
    assert dec.engine == "tensor_cores"
    plan = dec.plan(*table)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)  # poisoned
    got, lse = dec.run(q, cache, out=out, return_lse=True)
    check_against_reference(settings, q, cache, table, got, lse, plan)
    empty = torch.tensor([n == 0 for n in lengths])
    assert (got.cpu()[empty] == 0).all()


def test_split_merges(device):
    """A request longer than one CTA's share is split and merged (partials of the one-token rows)."""
    settings = tilegraph.Settings(num_qo_heads=8, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                                  max_batch_size=2, max_num_pages=32, num_ctas=4)  # fmt: skip
    rng = np.random.default_rng()
    table = page_table([90, 3], settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device, False)
    q = torch.randn(2, 8, 16).half().to(device)
    dec = tilegraph.BatchDecode(settings, device=device)
    plan = dec.plan(*table)
    assert plan.num_merges > 0, plan
    got, lse = dec.run(q, cache, return_lse=True)
    check_against_reference(settings, q, cache, table, got, lse, plan)


@pytest.mark.parametrize("kind", ["device", "block_table"])
def test_device_page_tables(kind, device):
    settings = tilegraph.Settings(num_qo_heads=8, num_kv_heads=2, head_dim=16, page_size=4, dtype="bfloat16",
                                  max_batch_size=4, max_num_pages=32, num_ctas=3, debug_page_table=True)  # fmt: skip
    rng = np.random.default_rng()
    lengths = [13, 0, 22]
    indptr, pages, last = page_table(lengths, settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device, False)
    q = torch.randn(len(lengths), 8, 16).bfloat16().to(device)
    dec = tilegraph.BatchDecode(settings, device=device)
    if kind == "device":
        plan = dec.plan(indptr, pages.to(device), last, page_table="device")
    else:
        table = torch.full((len(lengths), 8), -1, dtype=torch.int32)  # -1 past each row's pages: never read
        for r in range(len(lengths)):
            table[r, : indptr[r + 1] - indptr[r]] = pages[indptr[r] : indptr[r + 1]]
        plan = dec.plan_block_table(table.to(device), np.array(lengths, np.int32))
    assert plan.page_table == kind
    got, lse = dec.run(q, cache, return_lse=True)
    check_against_reference(settings, q, cache, (indptr, pages, last), got, lse, plan)


def test_device_page_id_outside_the_pool_is_reported(device):
    settings = tilegraph.Settings(num_qo_heads=8, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                                  max_batch_size=2, max_num_pages=8, num_ctas=2, debug_page_table=True)  # fmt: skip
    cache = make_cache(settings, device, False)
    q = torch.randn(2, 8, 16).half().to(device)
    dec = tilegraph.BatchDecode(settings, device=device)
    dec.plan(np.array([0, 1, 2], np.int32), torch.tensor([3, 99], dtype=torch.int32, device=device),
             np.array([4, 2], np.int32), page_table="device")  # fmt: skip
    with pytest.raises(tilegraph.PageTableError, match="request 1"):
        dec.run(q, cache)


def test_padded_rows_untouched(device):
    settings = tilegraph.Settings(num_qo_heads=8, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                                  max_batch_size=4, max_num_pages=16, num_ctas=2)  # fmt: skip
    rng = np.random.default_rng()
    table = page_table([6, 9], settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device, False)
    q = torch.randn(4, 8, 16).half().to(device)
    dec = tilegraph.BatchDecode(settings, device=device)
    dec.plan(*table, padded_batch_size=4)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)
    dec.run(q, cache, out=out)
    ref, _ = decode_reference(q[:2], cache, settings, *table)
    assert relative_error(out[:2], ref) < TOLERANCE["float16"]
    assert torch.isnan(out[2:].float()).all()  # padded rows neither read nor written


def test_graph_replay_follows_new_plans(device):
    settings = tilegraph.Settings(num_qo_heads=8, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                                  max_batch_size=4, max_num_pages=32, num_ctas=3, graphs={"batch_sizes": [4]})  # fmt: skip
    dec = tilegraph.BatchDecode(settings, device=device)
    cache = make_cache(settings, device, False)

    def forward(inputs):
        return dec.run(inputs["q"], cache)

    example = {"q": torch.zeros(1, 8, 16, dtype=torch.float16, device=device)}
    runner = tilegraph.GraphRunner(forward, example, attention=dec)
    runner.capture_all(show_progress=False)
    rng = np.random.default_rng()
    for lengths in ([9, 3, 0], [70, 2, 5, 1]):  # the second splits its long request
        table = page_table(lengths, settings.page_size, settings.max_num_pages, rng)
        q = torch.randn(len(lengths), 8, 16).half().to(device)
        out = runner.run({"q": q}, *table, copy=True)
        ref, _ = decode_reference(q, cache, settings, *table)
        assert relative_error(out, ref) < TOLERANCE["float16"], dec.current_plan
    assert dec.current_plan.num_merges > 0


def test_deterministic_outputs_ignore_batch_mates(device):
    """deterministic=True: a request's output is bitwise the same alone and among other requests
    (the tensor-core engine then splits nothing, as prefill)."""
    settings = tilegraph.Settings(num_qo_heads=8, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                                  max_batch_size=3, max_num_pages=32, num_ctas=4, deterministic=True)  # fmt: skip
    rng = np.random.default_rng()
    cache = make_cache(settings, device, False)
    q = torch.randn(3, 8, 16).half().to(device)
    dec = tilegraph.BatchDecode(settings, device=device)
    alone = page_table([41], settings.page_size, settings.max_num_pages, rng)
    plan = dec.plan(*alone)
    assert plan.num_merges == 0, plan
    first = dec.run(q[:1], cache).clone()
    indptr, pages, last = alone
    others = torch.from_numpy(np.setdiff1d(np.arange(32), pages.numpy())[:6].astype(np.int32))  # 2 + 4 pages unused by it
    batch = (torch.tensor([0, int(indptr[1]), int(indptr[1]) + 2, int(indptr[1]) + 6], dtype=torch.int32),
             torch.cat([pages, others]), torch.tensor([int(last[0]), 3, 4], dtype=torch.int32))  # fmt: skip
    dec.plan(*batch)
    together = dec.run(q, cache)
    assert torch.equal(together[:1], first)
    ref, _ = decode_reference(q, cache, settings, *batch)
    assert relative_error(together, ref) < TOLERANCE["float16"]
