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


def tensor_loop(fn: sass.Function, found: list[sass.Loop], issue_trips: int = 1,
                score_tiles: int = 1) -> tuple[sass.Loop, int, int] | None:  # fmt: skip
    """(The KV-block loop of a tensor-core kernel, its fast-path instruction count, its tensor FLOP
    per iteration), or None without HMMA. The loop: the smallest of the loops holding the most tensor
    FLOP (the fragments' k-step loops are unrolled, so that is the loop over KV blocks). Its fast
    path: ``fast_path`` through the body -- an interior KV block, which branches around the
    masked-block code, the refused-page fix-up, the non-finite V scan and the scalar P V fallback --
    with each nested loop issuing cp.async counted ``issue_trips`` times (PerfHints: its iterations
    per block), by its own fast path. ``score_tiles`` > 1 (PerfHints: a KV stage computed as that
    many S tiles by a nested loop): that S-tile loop holds no copies, so the loop is the stage loop
    around it, charged the tile loop's fast path and FLOP ``score_tiles`` times (the stage's copies,
    waits and barriers once); an S-tile loop the compiler unrolled into the stage counts as it is."""
    with_mma = [loop for loop in found if tensor_flop(loop.body)]
    if not with_mma:
        return None
    most = max(tensor_flop(loop.body) for loop in with_mma)
    loop = min((l for l in with_mma if tensor_flop(l.body) == most), key=lambda l: len(l.body))
    flop, extra = tensor_flop(loop.body), 0
    has_copies = any(i.opcode.startswith("LDGSTS") for i in loop.body)
    stages = [l for l in found if l.start != loop.start and l.contains(loop) and any(i.opcode.startswith("LDGSTS") for i in l.body)]
    if score_tiles > 1 and not has_copies and stages:
        tile = loop
        loop = min(stages, key=lambda l: len(l.body))
        flop, extra = score_tiles * tensor_flop(tile.body), (score_tiles - 1) * fast_path(fn, tile)[1]
    copies = [l for l in found if loop.contains(l) and any(i.opcode.startswith("LDGSTS") for i in l.body)]
    outermost = [l for l in copies if not any(o.contains(l) for o in copies)]
    repeats = sum(fast_path(fn, l)[1] for l in outermost) * (max(issue_trips, 1) - 1)
    return loop, fast_path(fn, loop)[1] + repeats + extra, flop


#: a conditional forward branch skipping fewer instructions than this is charged them when taken:
#: the compiler leaves small selects as branches too (a NaN check, a -inf test) whose short side is
#: the rare one, so a short skip saves nothing on the fast path
SKIP_MIN_INSTRUCTIONS = 64


def fast_path(fn: sass.Function, loop: sass.Loop) -> tuple[int, int]:
    """(HMMA, instructions) of the path from the loop's head to its back edge with the most HMMA,
    then the most cp.async issues (the next block's copies are in flight), then the fewest
    instructions. A forward branch inside the body may be taken or not (an unconditional one must
    be); taking a conditional one that skips fewer than SKIP_MIN_INSTRUCTIONS costs what it skips; a
    branch leaving the body ends no path; a nested loop's backward branch falls through (its body
    counts once here; ``tensor_loop`` adds the other trips of the cp.async issue loops)."""
    body = loop.body
    index = {instr.addr: k for k, instr in enumerate(body)}
    # best[k]: (HMMA, LDGSTS, -instructions) from instruction k to the back edge, None: no path
    best: list[tuple[int, int, int] | None] = [None] * len(body)
    for k in range(len(body) - 1, -1, -1):
        instr = body[k]
        own = (int(pm.is_tensor(instr.opcode)), int(instr.opcode.startswith("LDGSTS")), -1)
        if k == len(body) - 1:
            best[k] = own
            continue
        tails = []
        target = fn.labels.get(instr.target, -1) if instr.opcode.startswith("BRA") else -1
        forward = target > instr.addr
        if forward and target in index and best[index[target]] is not None:
            hmma, copies, neg = best[index[target]]  # type: ignore[misc]
            skipped = index[target] - k - 1
            charge = skipped if not instr.unconditional and skipped < SKIP_MIN_INSTRUCTIONS else 0
            tails.append((hmma, copies, neg - charge))
        if not (forward and instr.unconditional) and best[k + 1] is not None:
            tails.append(best[k + 1])  # type: ignore[arg-type]
        if tails:
            tail = max(tails)
            best[k] = (own[0] + tail[0], own[1] + tail[1], own[2] + tail[2])
    if best[0] is None:
        return 0, len(body)
    return best[0][0], -best[0][2]


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
    tensor = tensor_loop(fn, sass.loops(fn), getattr(hints, "issue_trips", 1), getattr(hints, "score_tiles", 1))
    found = math_loops(inner)
    if tensor is not None:
        block, instrs, flop = tensor
        out["math"] = {
            "addresses": [f"0x{block.start:04x}"],
            "instructions": instrs,
            "flop": flop,
            "flop_per_warp_instr": flop / instrs,
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
