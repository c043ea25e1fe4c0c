"""Predicted time of one decode step: the plan's makespan as bytes, the partial merge, launches.

    step = makespan x bytes per cost unit x num_ctas / decode bandwidth       (the slowest CTA)
         + merge bytes / merge bandwidth                                      (when the plan splits)
         + LAUNCH_OVERHEAD_S per kernel launched

A cost unit is one KV token of one kv_head (``planner.plan``: tile cost = tokens +
TILE_OVERHEAD_TOKENS), i.e. its K and V rows; every CTA is assumed to stream at 1/num_ctas of the
decode kernel's predicted bandwidth. The merge reads each split slot's fp32 partial rows and LSEs
and writes the merged rows. Bandwidths come from the kernels' own predictions
(``kernel_profile``); docs/perf-model.md explains the terms.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import perf_model as pm

SKEWED_BATCH: tuple[int, ...] = (32768,) + (512,) * 63  # 1 x 32k + 63 x 512
BENCH_SHAPE = {"num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "page_size": 16, "dtype": "bfloat16"}


def plan_numbers(lengths: Sequence[int], num_ctas: int, shape: dict[str, Any] = BENCH_SHAPE) -> dict[str, int]:
    """Plan ``lengths`` on the host (planner only, no kernels) and return its makespan and split counts."""
    from tilegraph import Settings
    from tilegraph.planner.decode import plan_decode
    from tilegraph.planner.layout import DecodeLayout

    from .bench.common import page_table

    pages = sum(-(-n // shape["page_size"]) for n in lengths)
    settings = Settings(**shape, max_batch_size=len(lengths), max_num_pages=max(pages, 1), num_ctas=num_ctas)
    layout = DecodeLayout.from_settings(settings, num_ctas)
    indptr, indices, last = page_table(list(lengths), shape["page_size"], np.random.default_rng(0))
    plan = plan_decode(layout, indptr, indices, last, num_pages=settings.max_num_pages, serial=1)
    return {"makespan": int(plan.makespan), "num_tiles": int(plan.num_tiles), "num_merges": int(plan.num_merges),
            "num_slots": int(plan.num_slots), "num_ctas": num_ctas, "ideal": float(plan.ideal)}  # fmt: skip


def decode_step(plan: dict[str, Any], *, head_dim: int, group: int, elem_bytes: int, decode_bytes_per_s: float,
                merge_bytes_per_s: float, total_tokens: int, num_kv_heads: int) -> dict[str, Any]:  # fmt: skip
    """The step's terms in seconds (see the module docstring)."""
    unit_bytes = 2 * head_dim * elem_bytes  # K and V of one token of one kv_head
    decode_s = plan["makespan"] * unit_bytes * plan["num_ctas"] / decode_bytes_per_s
    merge_bytes = plan["num_slots"] * group * (head_dim * 4 + 4) + plan["num_merges"] * group * head_dim * elem_bytes
    split = plan["num_merges"] > 0
    merge_s = merge_bytes / merge_bytes_per_s if split else 0.0
    launches = 2 if split else 1
    kv_bytes = total_tokens * num_kv_heads * unit_bytes
    step_s = decode_s + merge_s + launches * pm.LAUNCH_OVERHEAD_S
    return {
        "kv_bytes": kv_bytes,
        "decode_s": decode_s,
        "merge_bytes": merge_bytes,
        "merge_s": merge_s,
        "launches": launches,
        "launch_s": launches * pm.LAUNCH_OVERHEAD_S,
        "step_s": step_s,
        "split_merge_s": merge_s + (pm.LAUNCH_OVERHEAD_S if split else 0.0),
        "balanced_s": kv_bytes / decode_bytes_per_s,  # the same bytes, perfectly spread, no merge
        "effective_bytes_per_s": kv_bytes / step_s,
    }


def skewed_step(decode_record: dict[str, Any], merge_record: dict[str, Any] | None) -> dict[str, Any]:
    """The decode step model on SKEWED_BATCH at the benchmark shape, for each GPU of perf_model.GPUS.

    ``decode_record`` / ``merge_record``: compile-check records (sm_90) of the decode kernel at the
    benchmark shape and of the partial merge for its dtype (128 threads, PARTIAL_MERGE_CTAS CTAs)."""
    from tilegraph.kernels.tuning import GPU_THREADS, PARTIAL_MERGE_CTAS

    shape = BENCH_SHAPE
    group = shape["num_qo_heads"] // shape["num_kv_heads"]
    out: dict[str, Any] = {"batch": "1 x 32768 + 63 x 512", "shape": dict(shape), "gpus": {}}
    from tilegraph.kernels.decode_pipeline import pipeline_config
    from tilegraph.kernels.primitives import BF16

    per_sm = pipeline_config(BF16, shape["head_dim"], group).ctas_per_sm()  # BatchDecode's default num_ctas
    for gpu in pm.GPUS:
        num_ctas = per_sm * gpu.sms
        plan = plan_numbers(SKEWED_BATCH, num_ctas)
        decode_bw = decode_record["perf"]["predicted"][gpu.name]["memory"]["predicted_bytes_per_s"]
        merge_bw = _merge_bandwidth(gpu, merge_record, GPU_THREADS, PARTIAL_MERGE_CTAS)
        step = decode_step(plan, head_dim=shape["head_dim"], group=group, elem_bytes=2, decode_bytes_per_s=decode_bw,
                           merge_bytes_per_s=merge_bw, total_tokens=sum(SKEWED_BATCH), num_kv_heads=shape["num_kv_heads"])  # fmt: skip
        out["gpus"][gpu.name] = {"plan": plan, "decode_bytes_per_s": decode_bw, "merge_bytes_per_s": merge_bw, **step}
    out["decode_spec"] = decode_record["spec"]
    out["merge_spec"] = merge_record["spec"] if merge_record else None
    return out


def _merge_bandwidth(gpu: pm.Gpu, record: dict[str, Any] | None, threads: int, grid: int) -> float:
    kv = ((record or {}).get("perf") or {}).get("kv_loop")
    if not kv:
        return gpu.hbm_bytes_per_s  # no merge record: count its bytes at peak
    per_sm, active = pm.launched_per_sm(gpu, None, grid)
    occ = pm.occupancy(record["registers"], max(record.get("smem", 0), 0), threads, per_sm)
    return pm.predict_memory(gpu, kv["loads_in_flight"], threads, occ.resident, kv["instr_per_byte"], active).predicted_bytes_per_s
