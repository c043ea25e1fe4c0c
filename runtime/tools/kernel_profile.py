"""One compiled specialization's performance record: SASS structure, occupancy, predictions.

``profile`` reads the SASS of a kernel (``tilegraph.tools.sass``), finds its K/V loop (the
innermost loop whose global loads move the most bytes) and its math loops (the innermost loops
doing the most FLOP per iteration), and runs the model (``tilegraph.tools.perf_model``) for each
GPU of ``perf_model.GPUS`` on sm_90 code. The result is plain data (JSON-ready).
"""

from __future__ import annotations

from typing import Any

from . import perf_model as pm
from . import sass

MODEL_CC = "sm_90"  # the model's GPUs (H100, H200) run sm_90 code


def family_of(spec_name: str, hints: Any) -> str:
    return (getattr(hints, "family", "") or spec_name.split("[")[0]).strip()


def kv_loop(inner: list[sass.Loop]) -> sass.Loop | None:
    """The innermost loop whose global loads move the most bytes (ties: the longer body)."""
    loading = [loop for loop in inner if sass.global_load_bytes(loop.body) > 0]
    return max(loading, key=lambda loop: (sass.global_load_bytes(loop.body), len(loop.body)), default=None)


def math_loops(inner: list[sass.Loop]) -> list[sass.Loop]:
    """The innermost loops doing the most FLOP per iteration (all that tie)."""
    flop = {loop.start: loop_flop(loop) for loop in inner}
    most = max(flop.values(), default=0)
    return [loop for loop in inner if most > 0 and flop[loop.start] == most]


def loop_flop(loop: sass.Loop) -> int:
    return sum(pm.flop_of(i.opcode) for i in loop.body)


def tensor_flop(instrs: tuple[sass.Instr, ...]) -> int:
    return sum(pm.flop_of(i.opcode) for i in instrs if pm.is_tensor(i.opcode))


def tensor_loop(found: list[sass.Loop]) -> tuple[sass.Loop, int] | None:
    """(The KV-block loop of a tensor-core kernel, its fast-path instruction count), or None without
    HMMA. The loop: the smallest of the loops holding the most tensor FLOP (the fragments' k-step
    loops are unrolled, so that is the loop over KV blocks). Its fast path: the body without the
    nested loops that issue no HMMA and no LDGSTS (the scalar fallback P V, the non-finite scan: taken
    only on masked blocks next to Inf/NaN V); nested cp.async issue loops count once (at the GPU
    shapes they run 2-4 times: the count is a lower bound)."""
    with_mma = [loop for loop in found if tensor_flop(loop.body)]
    if not with_mma:
        return None
    most = max(tensor_flop(loop.body) for loop in with_mma)
    loop = min((l for l in with_mma if tensor_flop(l.body) == most), key=lambda l: len(l.body))
    nested = [l for l in found if l is not loop and loop.start <= l.start and l.end <= loop.end]
    outer = [l for l in nested if not any(o is not l and o.start <= l.start and l.end <= o.end for o in nested)]
    skipped = sum(len(l.body) for l in outer
                  if not tensor_flop(l.body) and not any(i.opcode.startswith("LDGSTS") for i in l.body))  # fmt: skip
    return loop, len(loop.body) - skipped


def profile(sass_text: str, cc: str, registers: int, smem: int, spec_name: str, hints: Any = None) -> dict[str, Any]:
    """The performance record of one (spec, cc); ``hints`` is the spec's ``PerfHints`` (or None)."""
    fn = sass.kernel_function(sass.parse(sass_text))
    inner = sass.innermost(sass.loops(fn))
    out: dict[str, Any] = {
        "family": family_of(spec_name, hints),
        "sass_instructions": len(fn.instrs),
        "counts": sass.count(fn.instrs),
        "loops": len(inner),
        "threads": getattr(hints, "threads", None),
        "kv_loop": None,
        "math": None,
        "occupancy": None,
        "predicted": {},
    }
    threads = out["threads"]
    loop = kv_loop(inner)
    if loop is not None:
        wide = sass.global_load_bytes(loop.body, width=sass.WIDE_LOAD)
        per_warp = wide * getattr(hints, "hbm_fraction", 1.0) or sass.global_load_bytes(loop.body)
        out["kv_loop"] = {
            "address": f"0x{loop.start:04x}",
            "instructions": len(loop.body),
            "counts": sass.count(loop.body),
            "load_bytes_per_warp": sass.global_load_bytes(loop.body),
            "hbm_bytes_per_warp": per_warp,
            "instr_per_byte": len(loop.body) / per_warp,
            "loads_in_flight": sass.in_flight_loads(loop.body),
        }
    tensor = tensor_loop(sass.loops(fn))
    found = math_loops(inner)
    if tensor is not None:
        block, instrs = tensor
        out["math"] = {
            "addresses": [f"0x{block.start:04x}"],
            "instructions": instrs,
            "flop": tensor_flop(block.body),
            "flop_per_warp_instr": tensor_flop(block.body) / instrs,
            "tensor": True,
        }
    elif found:
        flop = sum(loop_flop(m) for m in found)
        instrs = sum(len(m.body) for m in found)
        out["math"] = {
            "addresses": [f"0x{m.start:04x}" for m in found],
            "instructions": instrs,
            "flop": flop,
            "flop_per_warp_instr": flop / instrs,
            "tensor": any(pm.is_tensor(i.opcode) for m in found for i in m.body),
        }
    if cc == MODEL_CC and threads:
        out["occupancy"], out["predicted"] = _predict(out, registers, smem, threads, hints)
    return out


def _predict(out: dict[str, Any], registers: int, smem: int, threads: int, hints: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    ctas_per_sm = getattr(hints, "ctas_per_sm", None)
    grid = getattr(hints, "grid_ctas", None)
    bound = getattr(hints, "bound", "memory")
    predicted: dict[str, Any] = {}
    occ_json: dict[str, Any] = {}
    for gpu in pm.GPUS:
        per_sm, active = pm.launched_per_sm(gpu, ctas_per_sm, grid)
        occ = pm.occupancy(registers, smem, threads, per_sm)
        occ_json = {**occ.__dict__, "limiter": occ.limiter, "active_sms": active}
        entry: dict[str, Any] = {"bound": bound}
        kv = out["kv_loop"]
        if kv is not None:
            entry["memory"] = pm.predict_memory(gpu, kv["loads_in_flight"], threads, occ.resident, kv["instr_per_byte"], active).as_json()
        if out["math"] is not None:
            entry["compute"] = pm.predict_compute(gpu, out["math"]["flop_per_warp_instr"], out["math"]["tensor"], active).as_json()
        main = entry.get("compute" if bound == "compute" else "memory")
        entry["fraction_of_peak"] = None if main is None else main["fraction_of_peak"]
        predicted[gpu.name] = entry
    return occ_json, predicted
