"""The static performance model's arithmetic on hand-computed inputs (docs/perf-model.md)."""

from __future__ import annotations

import pytest

from tilegraph.tools import perf_model as pm
from tilegraph.tools import step_model


def test_constants_are_the_documented_ones() -> None:
    assert (pm.H100_SXM.sms, pm.H100_SXM.hbm_bytes_per_s, pm.H100_SXM.clock_hz) == (132, 3.35e12, 1.83e9)
    assert (pm.H200.sms, pm.H200.hbm_bytes_per_s, pm.H200.copy_bytes_per_s, pm.H200.clock_hz) == (132, 4.8e12, 4.3e12, 1.83e9)
    assert pm.HBM_LATENCY_S == 700e-9
    assert (pm.REGS_PER_SM, pm.SMEM_PER_SM, pm.MAX_CTAS_PER_SM) == (65536, 228 * 1024, 32)


def test_occupancy_limits() -> None:
    # 128 regs x 32 lanes = 4096 per warp, 4 warps -> 16384 per CTA -> 4 by registers;
    # smem 5184 + 1024 reserved = 6208 -> 6272 (128-byte units) -> 233472 // 6272 = 37; threads 2048 // 128 = 16
    occ = pm.occupancy(128, 5184, 128, launched_per_sm=2)
    assert (occ.by_registers, occ.by_shared, occ.by_threads, occ.by_launch, occ.resident) == (4, 37, 16, 2, 2)
    assert occ.limiter == "launch"
    # 130 regs: 4160 per warp -> 4352 (256-register units) x 4 warps = 17408 -> 3
    assert pm.occupancy(130, 0, 128).by_registers == 3
    assert pm.occupancy(130, 0, 128).resident == 3 and pm.occupancy(130, 0, 128).limiter == "registers"
    # 100 KB of shared memory: (102400 + 1024) -> 103424 -> 2 per SM
    assert pm.occupancy(32, 100 * 1024, 128).resident == 2
    # tiny kernels stop at 32 CTAs per SM
    assert pm.occupancy(16, 0, 32).resident == 32


def test_launched_per_sm() -> None:
    assert pm.launched_per_sm(pm.H100_SXM, 2, None) == (2, 132)
    assert pm.launched_per_sm(pm.H100_SXM, None, 4) == (1, 4)  # a 4-CTA grid: 4 SMs with one CTA each
    assert pm.launched_per_sm(pm.H100_SXM, None, 300) == (3, 132)
    assert pm.launched_per_sm(pm.H100_SXM, None, None) == (None, 132)


def test_latency_bound_prediction() -> None:
    # 1 load x 16 B x 128 threads x 2 CTAs = 4096 B per SM; x 132 SMs / 700 ns = 772.389 GB/s
    p = pm.predict_memory(pm.H100_SXM, loads_in_flight=1, threads=128, resident_ctas=2, instr_per_byte=0.4)
    assert p.bytes_in_flight_per_sm == 4096
    assert p.littles_bytes_per_s == pytest.approx(4096 * 132 / 700e-9)
    assert p.issue_bytes_per_s == pytest.approx(4 * 1.83e9 * 132 / 0.4)  # 2.4156 TB/s
    assert p.predicted_bytes_per_s == pytest.approx(772.389e9, rel=1e-5)
    assert p.fraction_of_peak == pytest.approx(772.389e9 / 3.35e12, rel=1e-5)  # 23.1 %
    assert p.bound.startswith("latency") and p.fraction_of_copy is None
    h200 = pm.predict_memory(pm.H200, 1, 128, 2, 0.4)
    assert h200.fraction_of_peak == pytest.approx(772.389e9 / 4.8e12, rel=1e-5)  # 16.1 %
    assert h200.fraction_of_copy == pytest.approx(772.389e9 / 4.3e12, rel=1e-5)


def test_issue_bound_prediction_and_peak_cap() -> None:
    # 8 loads x 16 x 128 x 4 = 64 KB per SM: Little gives 12.4 TB/s; 1 instr/B caps it at 4 x 1.83e9 x 132 = 966.24 GB/s
    p = pm.predict_memory(pm.H100_SXM, 8, 128, 4, 1.0)
    assert p.predicted_bytes_per_s == pytest.approx(966.24e9)
    assert p.bound == "instruction issue"
    # both ceilings above the datasheet: the prediction is the peak
    assert pm.predict_memory(pm.H100_SXM, 8, 128, 4, 0.05).fraction_of_peak == pytest.approx(1.0)
    # a 4-CTA grid works on 4 SMs only
    small = pm.predict_memory(pm.H100_SXM, 2, 128, 1, 0.5, active_sms=4)
    assert small.predicted_bytes_per_s == pytest.approx(2 * 16 * 128 * 4 / 700e-9)


def test_flop_per_warp_instruction() -> None:
    assert pm.flop_of("FFMA") == 64 and pm.flop_of("FADD.FTZ") == 32 and pm.flop_of("HFMA2.MMA") == 128
    assert pm.flop_of("HMMA.16816.F32.BF16") == 4096  # m16 n8 k16 x 2
    assert pm.flop_of("HMMA.1688.F32") == 2048
    assert pm.flop_of("HGMMA.64x128x16.F32.BF16") == 2 * 64 * 128 * 16 // 4  # per warp of the warpgroup
    assert pm.flop_of("IMAD.WIDE") == 0 and pm.flop_of("LDG.E.128") == 0


def test_compute_prediction() -> None:
    # 64 FLOP per warp instruction (all FFMA): 4 x 1.83e9 x 132 x 64 = 61.84 TFLOP/s = the FP32 peak = 1/16 of tensor
    p = pm.predict_compute(pm.H100_SXM, 64.0, tensor=False)
    assert p.issue_flop_per_s == pytest.approx(61.839e12, rel=1e-4)
    assert p.predicted_flop_per_s == pytest.approx(p.peak_flop_per_s)
    assert p.fraction_of_peak == pytest.approx(256 / 4096)
    # 5 FLOP per instruction: 4.83 TFLOP/s, 0.49 % of the 989.4 TFLOP/s tensor peak
    q = pm.predict_compute(pm.H100_SXM, 5.0, tensor=False)
    assert q.predicted_flop_per_s == pytest.approx(4 * 1.83e9 * 132 * 5)
    assert q.fraction_of_peak == pytest.approx(q.predicted_flop_per_s / (4096 * 1.83e9 * 132))
    # tensor cores: capped by the tensor peak
    assert pm.predict_compute(pm.H100_SXM, 4096.0, tensor=True).fraction_of_peak == pytest.approx(1.0)


def test_decode_step_terms() -> None:
    plan = {"makespan": 1000, "num_ctas": 264, "num_merges": 5, "num_slots": 10}
    got = step_model.decode_step(plan, head_dim=128, group=4, elem_bytes=2, decode_bytes_per_s=1e12,
                                 merge_bytes_per_s=1e11, total_tokens=20000, num_kv_heads=8)  # fmt: skip
    # the slowest CTA: 1000 units x 512 B at 1e12 / 264 B/s
    assert got["decode_s"] == pytest.approx(1000 * 512 * 264 / 1e12)
    # merge: 10 slots x 4 heads x (128 x 4 + 4) read + 5 rows x 4 heads x 128 x 2 written
    assert got["merge_bytes"] == 10 * 4 * 516 + 5 * 4 * 256
    assert got["merge_s"] == pytest.approx(got["merge_bytes"] / 1e11)
    assert got["launches"] == 2 and got["launch_s"] == pytest.approx(2 * pm.LAUNCH_OVERHEAD_S)
    assert got["step_s"] == pytest.approx(got["decode_s"] + got["merge_s"] + 2 * pm.LAUNCH_OVERHEAD_S)
    assert got["balanced_s"] == pytest.approx(20000 * 8 * 512 / 1e12)
    unsplit = step_model.decode_step({**plan, "num_merges": 0, "num_slots": 0}, head_dim=128, group=4, elem_bytes=2,
                                     decode_bytes_per_s=1e12, merge_bytes_per_s=1e11, total_tokens=20000, num_kv_heads=8)  # fmt: skip
    assert unsplit["launches"] == 1 and unsplit["merge_s"] == 0 and unsplit["split_merge_s"] == 0


def test_skewed_batch_plan_is_a_number() -> None:
    plan = step_model.plan_numbers(step_model.SKEWED_BATCH, num_ctas=264)
    total_units = 8 * (32768 + 63 * 512)
    assert plan["num_ctas"] == 264 and plan["makespan"] >= total_units / 264
    assert plan["num_merges"] > 0  # the 32k request is split across CTAs
