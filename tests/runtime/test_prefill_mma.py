"""The tensor-core prefill kernel (kernels/prefill_mma.py) on the plan and launch arguments of
BatchPrefill / BatchPrefillRagged, against the float64 reference.

The objects below launch the mma kernel in place of the CUDA-core one (same PREFILL_ARGS, same plan).
Tolerances: q, k, v are fp16/bf16 and so is P (packed for the P V mma, as on the GPU); scores and O
accumulate in fp32. P's rounding (2^-11 fp16, 2^-8 bf16 relative per weight) dominates: a relative
error of a few units of that over the output -> 4e-3 fp16, 2e-2 bf16 (the CUDA-core kernel's
bounds); the LSE depends on fp32 scores only: 1e-4 (1e-3 bf16: q and k rounded the same way, but
the bf16 reference sees the same rounded inputs, so only fp32 summation order differs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.kernels.launch import launch
from tilegraph.kernels.prefill import PREFILL_ARGS
from tilegraph.kernels.prefill_mma import PrefillMmaConfig, prefill_mma_kernel
from tilegraph.serving.reference import relative_error

from .test_prefill import make_cache, make_q, paged_kv_of, reference, tables

TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2}
LSE_TOLERANCE = 1e-4


class _MmaLaunch:
    """PrefillAttention.launch with the tensor-core kernel; counts its launches."""

    mma_launches = 0

    def launch(self, q, kv, out, lse):
        s = self.settings
        cfg = PrefillMmaConfig(self.kind_code, s.head_dim, s.group_size, self.PAGED, self.causal, self.hooks)
        out_words = self.output_words(out)
        lse_arg = lse.view(-1) if lse is not None else self.workspace.no_lse
        row_qo_pos, entry_kv_offset = self.positions or (self._no_positions, self._no_positions)
        values = PREFILL_ARGS.values(
            **self.plan_sections(PREFILL_ARGS.names),
            **self.shared_launch_values(q, kv, out_words, lse_arg, lse is not None),
            row_qo_pos=row_qo_pos, entry_kv_offset=entry_kv_offset, use_positions=np.int32(self.positions is not None),
        )  # fmt: skip
        launch("prefill_mma", prefill_mma_kernel(cfg), (self.num_ctas,), cfg.block, values)
        type(self).mma_launches += 1
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


def run_paged(overrides, requests, causal, device, split=None):
    rng = np.random.default_rng()
    settings = tilegraph.Settings(max_batch_size=4, max_num_pages=64, max_num_tokens=48, **{"num_ctas": 2, **overrides})
    qo_indptr, kv_indptr, kv_indices, last = tables(requests, settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device, False)
    q = make_q(settings, int(qo_indptr[-1]), device)
    pre = MmaPrefill(settings, causal=causal, device=device)
    plan = pre.plan(qo_indptr, kv_indptr, kv_indices, last)
    if split is not None:
        assert (plan.num_merges > 0) == split, plan
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)
    before = MmaPrefill.mma_launches
    got, lse = pre.run(q, cache, out=out, return_lse=True)
    assert MmaPrefill.mma_launches == before + 1
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
