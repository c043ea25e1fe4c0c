"""The tensor-core prefill kernel (kernels/prefill_mma.py) on the plan and launch arguments of
BatchPrefill / BatchPrefillRagged, against the float64 reference.

The objects below launch the mma kernel in place of the CUDA-core one (same PREFILL_ARGS, same plan).
Tolerances: q, k, v are fp16/bf16 and so is P (packed for the P V mma, as on the GPU); scores and O
accumulate in fp32. P's rounding (2^-11 fp16, 2^-8 bf16 relative per weight) dominates: a relative
error of a few units of that over the output -> 4e-3 fp16, 2e-2 bf16 (the CUDA-core kernel's
bounds); the LSE depends on fp32 scores only: 1e-4 (1e-3 bf16: q and k rounded the same way, but
the bf16 reference sees the same rounded inputs, so only fp32 summation order differs). With query /
key transforms (RoPE, a key hook) the transformed q / k are rounded back to fp16 for the mma (the
CUDA-core kernel keeps them fp32): 2^-11 relative per element on scores of a few units -> LSE 1e-3.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.kernels import primitives as prim
from tilegraph.kernels.launch import launch
from tilegraph.kernels.prefill import PREFILL_ARGS
from tilegraph.kernels.prefill_mma import PrefillMmaConfig, prefill_mma_kernel
from tilegraph.kernels.tuning import prefill_mma_shape
from tilegraph.serving.reference import relative_error

from .test_prefill import make_cache, make_q, paged_kv_of, reference, tables

TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2}
LSE_TOLERANCE = 1e-4


class _MmaLaunch:
    """PrefillAttention.launch with the tensor-core kernel; counts its launches. ``SHAPE``: the
    kernel's (warps, kv_tokens[, score_tokens]), ``Q_SHARED`` its q_in_shared and ``TILE_ROWS`` the plan's tile rows (None: the tuning table's)."""

    mma_launches = 0
    SHAPE: tuple[int, ...] | None = None
    Q_SHARED: bool | None = None  # PrefillMmaConfig.q_in_shared
    TILE_ROWS: int | None = None

    def make_layout(self):
        layout = super().make_layout()
        return layout if self.TILE_ROWS is None else dataclasses.replace(layout, tile_rows=self.TILE_ROWS)

    def launch(self, q, kv, out, lse):
        s = self.settings
        warps, kv_tokens, score_tokens = (*(self.SHAPE or (0, 0)), 0)[:3]
        cfg = PrefillMmaConfig(self.kind_code, s.head_dim, s.group_size, self.PAGED, self.causal, self.hooks,
                               warps=warps, kv_tokens=kv_tokens, score_tokens=score_tokens,
                               q_in_shared=self.Q_SHARED)  # fmt: skip
        out_words = self.output_words(out)
        lse_arg = lse.view(-1) if lse is not None else self.workspace.no_lse
        row_qo_pos, entry_kv_offset = self.positions or (self._no_positions, self._no_positions)
        values = PREFILL_ARGS.values(
            **self.plan_sections(PREFILL_ARGS.names),
            **self.shared_launch_values(q, kv, out_words, lse_arg, lse is not None),
            row_qo_pos=row_qo_pos, entry_kv_offset=entry_kv_offset, use_positions=np.int32(self.positions is not None),
            **self.page_div_values,
        )  # fmt: skip
        launch("prefill_mma", prefill_mma_kernel(cfg), (self.num_ctas,), cfg.block, values, cfg.dynamic_shared_bytes)
        _MmaLaunch.mma_launches += 1
        self.launch_partial_merge(out_words, lse, prefill=True)


class MmaPrefill(_MmaLaunch, tilegraph.BatchPrefill):
    pass


class MmaPrefillRagged(_MmaLaunch, tilegraph.BatchPrefillRagged):
    pass


def check(got, lse, ref_out, ref_lse, dtype, context):
    assert not torch.isnan(got).any(), context
    assert relative_error(got, ref_out) < TOLERANCE[dtype], context
    finite = torch.isfinite(ref_lse)
    assert relative_error(lse.cpu()[finite], ref_lse[finite]) < LSE_TOLERANCE, context
    assert torch.isneginf(lse.cpu()[~finite]).all(), context


def run_paged(overrides, requests, causal, device, split=None, cls=None):
    rng = np.random.default_rng()
    sizes = {"max_batch_size": 4, "max_num_pages": 64, "max_num_tokens": 48, "num_ctas": 2}
    settings = tilegraph.Settings(**{**sizes, **overrides})
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device, False)
    q = make_q(settings, int(qo_indptr[-1]), device)
    cls = cls or MmaPrefill
    pre = cls(settings, causal=causal, device=device)
    plan = pre.plan(qo_indptr, kv_indptr, kv_indices, last)
    if split is not None:
        assert (plan.num_merges > 0) == split, plan
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)
    before = _MmaLaunch.mma_launches
    got, lse = pre.run(q, cache, out=out, return_lse=True)
    assert _MmaLaunch.mma_launches == before + 1
    ref_out, ref_lse = reference(q, settings, requests, causal, paged_kv_of(cache, settings, kv_indptr, kv_indices, requests))
    check(got, lse, ref_out, ref_lse, settings.dtype, plan)


CASES = [
    ("f16-hd16-g1-p4-causal", dict(num_qo_heads=1, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16"),
        [(5, 21)], True, None),
    ("bf16-hd32-g2-p16-full", dict(num_qo_heads=4, num_kv_heads=2, head_dim=32, page_size=16, dtype="bfloat16"),
        [(3, 18), (1, 5)], False, None),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mma_prefill_matches_reference(case, device):
    _, overrides, requests, causal, split = case
    run_paged(overrides, requests, causal, device, split)


MORE_CASES = [
    # several KV stages (double buffering), a causal prefix, a decode row, GQA rows packed
    ("f16-hd32-g2-p4-causal-stages", dict(num_qo_heads=4, num_kv_heads=2, head_dim=32, page_size=4, dtype="float16"),
        [(6, 40), (1, 23)], True, False),
    ("bf16-hd16-g1-p16-causal-split", dict(num_qo_heads=1, num_kv_heads=1, head_dim=16, page_size=16, dtype="bfloat16",
        num_ctas=6), [(2, 100), (9, 9)], True, True),
    ("f16-hd64-g1-p8-full", dict(num_qo_heads=1, num_kv_heads=1, head_dim=64, page_size=8, dtype="float16"),
        [(3, 20)], False, False),
    ("bf16-hd128-g1-p16-causal", dict(num_qo_heads=1, num_kv_heads=1, head_dim=128, page_size=16, dtype="bfloat16"),
        [(2, 18)], True, False),
    ("f16-hd48-g2-p1-causal-HND", dict(num_qo_heads=2, num_kv_heads=1, head_dim=48, page_size=1, dtype="float16",
        kv_layout="HND"), [(4, 19)], True, False),  # 6 chunks a row: a 2-chunk swizzle
    ("f16-hd16-g20-two-passes", dict(num_qo_heads=20, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16"),
        [(2, 11)], True, False),
]  # fmt: skip


@pytest.mark.parametrize("case", MORE_CASES, ids=[c[0] for c in MORE_CASES])
def test_mma_prefill_more_shapes(case, device):
    _, overrides, requests, causal, split = case
    run_paged(overrides, requests, causal, device, split)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_mma_prefill_ragged(causal, device):
    settings = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, dtype="float16", max_batch_size=4,
                                  max_num_tokens=32, num_ctas=3)  # fmt: skip
    requests = [(7, 19), (1, 33), (4, 4), (3, 0)]
    kv_indptr = torch.tensor(np.concatenate([[0], np.cumsum([kv for _, kv in requests])]), dtype=torch.int32)
    qo_indptr = torch.tensor(np.concatenate([[0], np.cumsum([qo for qo, _ in requests])]), dtype=torch.int32)
    shape = (int(kv_indptr[-1]) + 3, 2, 16)
    k = torch.randn(shape).to(torch.float16).to(device)
    v = torch.randn(shape).to(torch.float16).to(device)
    v[int(kv_indptr[-1]) :] = float("nan")  # rows past the KV: never read
    q = make_q(settings, int(qo_indptr[-1]), device)
    pre = MmaPrefillRagged(settings, causal=causal, device=device)
    plan = pre.plan(qo_indptr, kv_indptr)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)
    got, lse = pre.run(q, k, v, out=out, return_lse=True)

    def kv_of(r):
        a, b = int(kv_indptr[r]), int(kv_indptr[r + 1])
        return k[a:b].double().cpu(), v[a:b].double().cpu()

    ref_out, ref_lse = reference(q, settings, requests, causal, kv_of)
    finite = torch.isfinite(ref_lse).all(dim=1)
    assert (got[~finite] == 0).all() and torch.isneginf(lse[~finite]).all()  # the empty-KV request: 0 and -inf
    check(got, lse, ref_out.nan_to_num(0.0), ref_lse, "float16", plan)


def test_nan_in_v_reaches_only_the_rows_that_see_it(device):
    """Causal diagonal block with NaN V at position p: rows before p stay finite and exact (the mma's
    0 * NaN would poison them; the scalar path selects it out), rows from p on are NaN."""
    settings = tilegraph.Settings(num_qo_heads=1, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                                  max_batch_size=2, max_num_pages=16, max_num_tokens=16, num_ctas=1)  # fmt: skip
    rng = np.random.default_rng()
    requests = [(10, 10)]
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, 4, 16, rng)
    cache = make_cache(settings, device, False)
    p = 6
    page = int(kv_indices[p // 4])
    cache[page, 1, p % 4] = float("nan")
    q = make_q(settings, 10, device)
    pre = MmaPrefill(settings, causal=True, device=device)
    pre.plan(qo_indptr, kv_indptr, kv_indices, last)
    got, lse = pre.run(q, cache, return_lse=True)
    assert torch.isnan(got[p:]).all() and not torch.isnan(got[:p]).any()
    kv_of = paged_kv_of(cache, settings, kv_indptr, kv_indices, requests)
    ref_out, ref_lse = reference(q[:p], settings, [(p, p)], True, lambda r: tuple(t[:p] for t in kv_of(0)))
    check(got[:p], lse[:p], ref_out, ref_lse, "float16", "rows before the NaN")


# ---- variants: the mma kernel against the CUDA-core kernel (itself checked against float64) --------


def _scale_keys(vals, dim0, request, kv_head, pos, params, key_gain):
    for k in range(8):
        vals[k] *= params[key_gain + request]


def _square_out(vals, dim0, request, qo_head, pos, params, out_gain):
    for k in range(8):
        vals[k] = vals[k] * vals[k] * params[out_gain + request] + 0.25 * (pos % 3)


def _variants():
    from tilegraph import variants as V

    user = tilegraph.Variant("user", key_transform=_scale_keys, output_transform=_square_out,
                             params={"key_gain": "request", "out_gain": "request"})  # fmt: skip
    return {
        "window+sinks+softcap": (V.combine(V.sliding_window(5), V.attention_sinks(), V.soft_cap(1.5)),
                                 {"sinks": torch.randn(4)}),
        "alibi": (V.alibi(), None),
        "rope": (V.rope(), None),
        "sigmoid": (V.sigmoid_attention(0.3), None),
        "user-key-output": (user, {"key_gain": torch.rand(4) + 0.5, "out_gain": torch.rand(4) + 0.5}),
    }


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("name", ["window+sinks+softcap", "alibi", "rope", "sigmoid", "user-key-output"])
def test_mma_variants_match_the_cuda_core_kernel(name, split, device):
    variant, params = _variants()[name]
    settings = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16",
                                  max_batch_size=4, max_num_pages=48, max_num_tokens=16,
                                  num_ctas=8 if split else 1)  # fmt: skip
    rng = np.random.default_rng()
    requests = [(3, 40), (1, 37), (5, 5)]
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, 4, 48, rng)
    cache = make_cache(settings, device, False)
    q = make_q(settings, int(qo_indptr[-1]), device)
    results = []
    for cls in (tilegraph.BatchPrefill, MmaPrefill):
        pre = cls(settings, causal=True, variant=variant, device=device)
        plan = pre.plan(qo_indptr, kv_indptr, kv_indices, last)
        assert (plan.num_merges > 0) == split, plan
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)
        result = pre.run(q, cache, out=out, return_lse=variant.softmax, params=params)
        results.append(result if variant.softmax else (result, None))
    (core, core_lse), (mma, mma_lse) = results
    assert not torch.isnan(mma).any()
    assert relative_error(mma, core.double()) < TOLERANCE["float16"], name
    if variant.softmax:
        lse_tol = 1e-3 if name in ("rope", "user-key-output") else LSE_TOLERANCE
        assert relative_error(mma_lse, core_lse.double()) < lse_tol, name


def test_mma_caller_positions_match_the_cuda_core_kernel(device):
    """bind_positions (CascadeAttention's path): arbitrary query positions and a kv offset, seen by
    the causal mask and a sliding window."""
    from tilegraph import variants as V

    settings = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="bfloat16",
                                  max_batch_size=2, max_num_pages=32, max_num_tokens=16, num_ctas=2)  # fmt: skip
    rng = np.random.default_rng()
    requests = [(4, 30), (3, 12)]
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, 4, 32, rng)
    cache = make_cache(settings, device, False)
    q = make_q(settings, 7, device)
    row_qo_pos = torch.tensor([40, 5, 44, 41, 20, 7, 25], dtype=torch.int32, device=device)
    entry_kv_offset = torch.tensor([12, 9], dtype=torch.int32, device=device)
    results = []
    for cls in (tilegraph.BatchPrefill, MmaPrefill):
        pre = cls(settings, causal=True, variant=V.sliding_window(9), device=device)
        pre.plan(qo_indptr, kv_indptr, kv_indices, last)
        pre.bind_positions(row_qo_pos, entry_kv_offset)
        results.append(pre.run(q, cache, return_lse=True))
    (core, core_lse), (mma, mma_lse) = results
    assert torch.equal(torch.isneginf(core_lse), torch.isneginf(mma_lse))
    visible = torch.isfinite(core_lse)
    assert visible.any() and not visible.all()  # some rows see nothing: 0 and -inf in both
    assert relative_error(mma[visible], core[visible].double()) < TOLERANCE["bfloat16"]
    assert (mma[~visible] == 0).all()
    assert relative_error(mma_lse[visible], core_lse[visible].double()) < LSE_TOLERANCE


# ---- multi-warp query tiles, plan tiles larger than a pass, the GPU tile shapes ---------------------


def shaped(shape, tile_rows, ragged=False):
    """An MmaPrefill class whose kernel has ``shape`` = (warps, kv_tokens) and plan ``tile_rows``."""
    base = MmaPrefillRagged if ragged else MmaPrefill
    return type(f"Mma{shape}x{tile_rows}", (base,), {"SHAPE": shape, "TILE_ROWS": tile_rows})


def test_two_warps_share_the_kv_stages(device):
    """2 warps x 16 rows (GQA 2: 16 tokens x 2 heads per pass), 32-token stages: the second warp's
    rows, a pass whose second warp has no rows (the 3-token request), causal diagonal blocks."""
    overrides = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16")
    run_paged(overrides, [(9, 21), (3, 5)], True, device, cls=shaped((2, 32), 32))


def test_plan_tiles_larger_than_one_pass(device):
    """64-row plan tiles on the 1-warp kernel (four passes of 16 rows per tile) and on the CUDA-core
    kernel (its 16-row passes), split-KV included: both kernels run any tile the planner makes."""
    overrides = dict(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="bfloat16", num_ctas=5)
    requests = [(21, 30), (2, 50)]
    run_paged(overrides, requests, True, device, split=True, cls=shaped((1, 16), 64))
    settings = tilegraph.Settings(max_batch_size=4, max_num_pages=64, max_num_tokens=48, **overrides)
    rng = np.random.default_rng()
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, 4, 64, rng)
    cache = make_cache(settings, device, False)
    q = make_q(settings, 23, device)

    class CorePrefill(tilegraph.BatchPrefill):
        def make_layout(self):
            return dataclasses.replace(super().make_layout(), tile_rows=64)

    pre = CorePrefill(settings, causal=True, device=device)
    plan = pre.plan(qo_indptr, kv_indptr, kv_indices, last)
    assert plan.layout.q_tile == 32 and plan.num_merges > 0
    assert int(np.max(plan.tiles()["q_end"] - plan.tiles()["q_start"])) > 16 // 2  # tiles beyond one pass
    got, lse = pre.run(q, cache, out=torch.full(q.shape, float("nan"), dtype=q.dtype, device=device), return_lse=True)
    ref_out, ref_lse = reference(q, settings, requests, True, paged_kv_of(cache, settings, kv_indptr, kv_indices, requests))
    check(got, lse, ref_out, ref_lse, "bfloat16", plan)


def test_copy_loop_with_several_rows_per_thread(device):
    """load_block gives each KV row to row_threads threads (one page lookup each per block); the
    one-warp 16-row GPU shape at head_dim 64 (64-token stages) has each thread issue two rows per
    block. (Every other GPU shape issues one: a valid shape has no thread without a row.)"""
    cfg = PrefillMmaConfig(prim.F16, 64, 2, True, True, warps=1, kv_tokens=64)
    assert (cfg.row_threads, cfg.issue_trips) == (1, 2)
    overrides = dict(num_qo_heads=2, num_kv_heads=1, head_dim=64, page_size=16, dtype="float16", num_ctas=1)
    run_paged(overrides, [(9, 150), (1, 37)], True, device, cls=shaped((1, 64), 16))


SCORE_TILE_CASES = [
    # one warp over 32-token stages computed as two 16-token S tiles: KV ends inside either tile of a
    # stage and on its edges, causal diagonals in either tile, a split request's chunks
    ("f16-hd16-g2-causal", dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16"),
        [(9, 47), (3, 16), (1, 33)], True, None),
    ("bf16-hd32-g1-full-split", dict(num_qo_heads=1, num_kv_heads=1, head_dim=32, page_size=8, dtype="bfloat16",
        num_ctas=5), [(5, 80), (2, 17)], False, True),
]  # fmt: skip


@pytest.mark.parametrize("case", SCORE_TILE_CASES, ids=[c[0] for c in SCORE_TILE_CASES])
def test_stages_of_several_score_tiles(case, device):
    """A KV stage of several S tiles (the head_dim 128 GPU shape: 64-token stages, 32-token tiles)."""
    _, overrides, requests, causal, split = case
    cfg = PrefillMmaConfig(prim.F16, overrides["head_dim"], 1, True, causal, warps=1, kv_tokens=32, score_tokens=16)
    assert (cfg.kv_block, cfg.score_block) == (32, 16)
    run_paged(overrides, requests, causal, device, split=split, cls=shaped((1, 32, 16), 16))


def _one_request_prefill(device, requests):
    settings = tilegraph.Settings(num_qo_heads=1, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                                  max_batch_size=2, max_num_pages=16, max_num_tokens=16, num_ctas=1,
                                  debug_page_table=True)  # fmt: skip
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, 4, 16, np.random.default_rng())
    cache = make_cache(settings, device, False)
    q = make_q(settings, int(qo_indptr[-1]), device)
    pre = shaped((1, 32, 16), 16)(settings, causal=True, device=device)
    return settings, (qo_indptr, kv_indptr, kv_indices, last), cache, q, pre


def test_nan_in_v_of_a_stages_second_score_tile(device):
    """Causal, 26 KV tokens in one 32-token stage: tile 0 (tokens 0-15) is unmasked for every row,
    the diagonal is in tile 1, where V holds a NaN at position 20. Only rows that see it are NaN: the
    selected path's V scan covers the tile being computed (a scan of tile 0 would miss the NaN and the
    mma's 0 * NaN would poison rows 16-19)."""
    requests = [(10, 26)]
    settings, (qo_indptr, kv_indptr, kv_indices, last), cache, q, pre = _one_request_prefill(device, requests)
    p = 20
    cache[int(kv_indices[p // 4]), 1, p % 4] = float("nan")
    pre.plan(qo_indptr, kv_indptr, kv_indices, last)
    got, lse = pre.run(q, cache, return_lse=True)
    first_nan = p - (26 - 10)  # query row at position 20
    assert torch.isnan(got[first_nan:]).all() and not torch.isnan(got[:first_nan]).any()
    k, v = paged_kv_of(cache, settings, kv_indptr, kv_indices, requests)(0)
    ref_out, ref_lse = reference(q[:first_nan], settings, [(first_nan, p)], True, lambda r: (k[:p], v[:p]))
    check(got[:first_nan], lse[:first_nan], ref_out, ref_lse, "float16", "rows before the NaN")


def test_refused_page_in_a_stages_second_score_tile(device):
    """A device page table whose 5th page (tokens 16-19: the second S tile of the first stage) is
    outside the pool: those tokens are left out of the softmax (the tile's own refused flags) and the
    step raises naming the request."""
    from tilegraph import PageTableError

    requests = [(3, 30)]
    settings, (qo_indptr, kv_indptr, kv_indices, last), cache, q, pre = _one_request_prefill(device, requests)
    bad = torch.as_tensor(kv_indices).clone()
    bad[4] = settings.max_num_pages + 3
    pre.plan(qo_indptr, kv_indptr, bad, last, page_table="device")
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)
    with pytest.raises(PageTableError, match="request 0"):
        pre.run(q, cache, out=out)
    k, v = paged_kv_of(cache, settings, kv_indptr, kv_indices, requests)(0)
    keep = torch.ones(30, dtype=torch.bool)
    keep[16:20] = False
    ref_out, _ = reference(q, settings, [(3, 26)], True, lambda r: (k[keep], v[keep]))
    assert relative_error(out, ref_out) < TOLERANCE["float16"]


Q_SHARED_CASES = [
    # Q's fragments re-read from the shared Q tile per S tile (the head_dim > 128 default, forced here)
    ("f16-hd32-g2-causal-stages", dict(num_qo_heads=4, num_kv_heads=2, head_dim=32, page_size=4, dtype="float16"),
        [(6, 40), (1, 23)], True, (1, 32, 16)),
    ("bf16-hd48-g1-full", dict(num_qo_heads=1, num_kv_heads=1, head_dim=48, page_size=8, dtype="bfloat16"),
        [(5, 37)], False, None),  # 3 k-steps: the odd one
    ("f16-hd16-g20-two-passes", dict(num_qo_heads=20, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16"),
        [(2, 11)], True, None),
]  # fmt: skip


@pytest.mark.parametrize("case", Q_SHARED_CASES, ids=[c[0] for c in Q_SHARED_CASES])
def test_q_tile_kept_in_shared_memory(case, device):
    _, overrides, requests, causal, shape = case
    cls = type("MmaQShared", (shaped(shape, None) if shape else MmaPrefill,), {"Q_SHARED": True})
    run_paged(overrides, requests, causal, device, cls=cls)


def test_head_dim_256_keeps_q_in_shared_memory(device):
    """head_dim 256 (Gemma): Q in registers (64 a lane) next to O (128) would spill, so the Q tile stays
    in shared memory by default; causal, GQA 2, across KV stages and a split."""
    assert PrefillMmaConfig(prim.BF16, 256, 2, True, True).q_shared
    assert not PrefillMmaConfig(prim.BF16, 128, 2, True, True).q_shared
    overrides = dict(num_qo_heads=4, num_kv_heads=2, head_dim=256, page_size=16, dtype="bfloat16", num_ctas=3)
    run_paged(overrides, [(3, 40), (1, 17)], True, device, split=True)


GPU_SHAPE_CASES = [
    # the GPU's launch shape (kernels.tuning.prefill_mma_shape(head_dim, simulator=False)) and tiles
    ("f16-hd64-g2-full", dict(num_qo_heads=2, num_kv_heads=1, head_dim=64, page_size=16, dtype="float16"),
        [(5, 70)], False),  # 8 warps x 16 rows, 64-token stages: two KV blocks, the second partial
    ("bf16-hd128-g1-causal", dict(num_qo_heads=1, num_kv_heads=1, head_dim=128, page_size=16, dtype="bfloat16"),
        [(20, 100)], True),  # 4 warps x 16 rows, 64-token stages of two 32-token S tiles: an interior stage,
    # then one whose first tile holds the diagonal and whose second is partial (4 tokens)
]  # fmt: skip


@pytest.mark.parametrize("case", GPU_SHAPE_CASES, ids=[c[0] for c in GPU_SHAPE_CASES])
def test_gpu_tile_shape(case, device):
    _, overrides, requests, causal = case
    shape = prefill_mma_shape(overrides["head_dim"], simulator=False)
    run_paged({**overrides, "num_ctas": 1}, requests, causal, device, cls=shaped((shape.warps, shape.kv_tokens), shape.rows))


BOUNDARY_QO = [1, 15, 16, 17, 63, 64, 65, 127, 128, 129]


@pytest.mark.slow
@pytest.mark.parametrize("qo_len", BOUNDARY_QO)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_boundaries_at_the_gpu_tile_size(qo_len, causal, device):
    """128-row tiles over 64-token stages (the head_dim <= 64 GPU shape, 8 warps, at head_dim 32,
    group 1: rows = tokens): qo_len around the tile and warp sizes; KV lengths qo_len (the causal
    diagonal on the last block) and qo_len + 65 (a prefix one token past a block), next to a decode
    row over 64 / 129 tokens (a full block, one past two: 7 of its tile's 8 warps idle). One CTA
    (split-KV has its own tests): the 8-warp simulation costs ~1-5 minutes per case."""
    shape = prefill_mma_shape(64, simulator=False)
    overrides = dict(num_qo_heads=1, num_kv_heads=1, head_dim=32, page_size=16, dtype="float16",
                     max_num_tokens=130, max_num_pages=64, num_ctas=1)  # fmt: skip
    for extra in (0, 65):
        requests = [(qo_len, qo_len + extra), (1, 64 + extra)]
        run_paged(overrides, requests, causal, device, cls=shaped((shape.warps, shape.kv_tokens), shape.rows))


def test_short_query_plans_launch_the_16_row_shape(device):
    """BatchPrefill launches the one-warp shape for a plan of short queries only and the tuning
    table's shape otherwise (here a 64-row layout stands in for the GPU's)."""

    class Wide(tilegraph.BatchPrefill):
        def make_layout(self):
            return dataclasses.replace(super().make_layout(), tile_rows=64)

    settings = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16",
                                  max_batch_size=4, max_num_pages=16, max_num_tokens=32, num_ctas=2)  # fmt: skip
    pre = Wide(settings, causal=True, device=device)
    rng = np.random.default_rng()
    for requests, short in (([(8, 12), (1, 5)], True), ([(9, 12)], False)):
        pre.plan(*tables(requests, 4, 16, rng))
        expected = pre.mma_short_config if short else pre.mma_config
        assert pre.tensor_core_launch_config() is expected
    assert pre.mma_short_config.rows == 16
