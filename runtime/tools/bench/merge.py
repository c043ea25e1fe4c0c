"""``python -m tilegraph bench merge``: merge_state / merge_states bandwidth against the copy ceiling.

Bytes counted per op: every input state read once (values + float32 LSEs) and the merged state
written once. Peers on the same tensors: the same math in eager torch (fp32), and FlashInfer's
``merge_state`` / ``merge_states`` if installed (fed base-2 LSEs, as FlashInfer expects). Every
output is checked against a float64 merge. CUDA-event medians after warm-up; input sets rotated
beyond the L2; random states, never zeros.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .common import (
    Reporter,
    Skip,
    Timing,
    choice_list,
    copy_bandwidth,
    int_list,
    on_gpu,
    plot_lines,
    rotation_sets,
    run_meta,
    stats_us,
    time_calls_us,
)

NEEDS_GPU = True
OPS = ("merge_state", "merge_states")
PEERS = ("torch", "flashinfer")
COLUMNS = [
    ("op", "op", ""), ("rows", "N", ""), ("num_states", "S", ""), ("impl", "impl", ""),
    ("median_us", "median µs", ".1f"), ("gbs", "GB/s", ".0f"), ("copy_fraction", "of copy", ".2f"),
    ("rel_err", "rel err", ".1e"), ("skipped", "skipped", ""),
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int_list, default=[1, 16, 128, 1024, 8192], help="N values, comma-separated")
    parser.add_argument("--num-states", type=int, default=8, help="S of merge_states")
    parser.add_argument("--ops", type=choice_list(OPS), default=list(OPS))
    parser.add_argument("--peers", type=choice_list(PEERS), default=list(PEERS))
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)


@dataclass
class MergeCase:
    op: str
    rows: int
    num_states: int  # 2 for merge_state
    device: torch.device
    v_sets: list[torch.Tensor]  # [N, S, H, D]
    s_sets: list[torch.Tensor]  # float32 [N, S, H], natural log
    reps: int
    warmup: int

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def bytes_moved(self) -> int:
        v, s = self.v_sets[0], self.s_sets[0]
        n, num_states, heads, head_dim = v.shape
        out_bytes = n * heads * (head_dim * v.element_size() + 4)
        return v.numel() * v.element_size() + s.numel() * 4 + out_bytes


def make_case(op: str, rows: int, args: argparse.Namespace, device: torch.device) -> MergeCase:
    num_states = 2 if op == "merge_state" else args.num_states
    dtype = getattr(torch, args.dtype)
    shape = (rows, num_states, args.num_heads, args.head_dim)
    set_bytes = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
    num_sets = 1 if device.type != "cuda" else rotation_sets(set_bytes, device)
    v_sets = [torch.randn(shape, device=device).to(dtype) for _ in range(num_sets)]
    s_sets = [torch.randn(shape[:3], device=device) * 3 for _ in range(num_sets)]
    return MergeCase(op, rows, num_states, device, v_sets, s_sets, args.reps, args.warmup)


def reference(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Merged values of [N, S, H, D] states in float64 (CPU)."""
    v, s = v.double().cpu(), s.double().cpu()
    weights = torch.softmax(s, dim=1)
    return (v * weights[..., None]).sum(dim=1)


# ---- implementations: each returns (timing, merged values of set 0) ------------------------------


def _pair_views(case: MergeCase) -> list[tuple[torch.Tensor, ...]]:
    """merge_state's operands per set: contiguous v_a, s_a, v_b, s_b."""
    return [(v[:, 0].contiguous(), s[:, 0].contiguous(), v[:, 1].contiguous(), s[:, 1].contiguous())
            for v, s in zip(case.v_sets, case.s_sets)]  # fmt: skip


def _timed(case: MergeCase, fn: Callable[[int], torch.Tensor]) -> tuple[Timing, torch.Tensor]:
    n = len(case.v_sets)
    result: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        result[i % n] = fn(i % n)

    return time_calls_us(call, case.reps, case.warmup, case.gpu), result[0]


def run_tilegraph(case: MergeCase) -> tuple[Timing, torch.Tensor]:
    from tilegraph import merge as ops

    if case.op == "merge_state":
        pairs = _pair_views(case)
        return _timed(case, lambda k: ops.merge_state(*pairs[k])[0])
    return _timed(case, lambda k: ops.merge_states(case.v_sets[k], case.s_sets[k])[0])


def _torch_pair(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor) -> torch.Tensor:
    m = torch.maximum(s_a, s_b)
    w_a, w_b = torch.exp(s_a - m), torch.exp(s_b - m)
    merged = (v_a.float() * w_a[..., None] + v_b.float() * w_b[..., None]) / (w_a + w_b)[..., None]
    return merged.to(v_a.dtype)


def _torch_states(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    weights = torch.softmax(s, dim=1)
    return (v.float() * weights[..., None]).sum(dim=1).to(v.dtype)


def run_torch(case: MergeCase) -> tuple[Timing, torch.Tensor]:
    if case.op == "merge_state":
        pairs = _pair_views(case)
        return _timed(case, lambda k: _torch_pair(*pairs[k]))
    return _timed(case, lambda k: _torch_states(case.v_sets[k], case.s_sets[k]))


def run_flashinfer(case: MergeCase) -> tuple[Timing, torch.Tensor]:
    try:
        import flashinfer
    except ImportError:
        raise Skip("flashinfer is not installed") from None
    if not case.gpu:
        raise Skip("FlashInfer needs a GPU")
    to_base2 = 1.0 / math.log(2.0)
    if case.op == "merge_state":
        pairs = [(va, sa * to_base2, vb, sb * to_base2) for va, sa, vb, sb in _pair_views(case)]
        return _timed(case, lambda k: flashinfer.merge_state(*pairs[k])[0])
    s2 = [s * to_base2 for s in case.s_sets]
    return _timed(case, lambda k: flashinfer.merge_states(case.v_sets[k], s2[k])[0])


IMPLS: dict[str, Callable[[MergeCase], tuple[Timing, torch.Tensor]]] = {
    "tilegraph": run_tilegraph, "torch": run_torch, "flashinfer": run_flashinfer,
}  # fmt: skip


def measure_case(case: MergeCase, impls: list[str], copy_gbs: float) -> list[dict[str, Any]]:
    from tilegraph.serving.reference import relative_error

    expected = reference(case.v_sets[0], case.s_sets[0])
    base = {"op": case.op, "rows": case.rows, "num_states": case.num_states, "bytes_moved": case.bytes_moved(),
            "input_sets": len(case.v_sets)}  # fmt: skip
    rows = []
    for name in impls:
        row = {**base, "impl": name}
        try:
            timing, merged = IMPLS[name](case)
        except Skip as why:
            rows.append({**row, "skipped": str(why)})
            continue
        except Exception as err:  # a peer failing must not cost the rest of the suite
            rows.append({**row, "skipped": f"error: {type(err).__name__}: {str(err)[:300]}"})
            continue
        s = stats_us(timing)
        gbs = case.bytes_moved() / (s["median_us"] * 1e3)
        rows.append({**row, **s, "gbs": gbs, "copy_fraction": gbs / copy_gbs if copy_gbs else None,
                     "rel_err": relative_error(merged, expected)})  # fmt: skip
    return rows


def _smoke_args(args: argparse.Namespace) -> argparse.Namespace:
    tiny = dict(rows=[4], num_states=3, num_heads=2, head_dim=16, dtype="float16", reps=1, warmup=0,
                peers=[p for p in args.peers if p == "torch"])  # fmt: skip
    return argparse.Namespace(**{**vars(args), **tiny})


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run the suite; writes ``merge.json`` (after every case) and ``merge.png`` into ``out_dir``."""
    smoke = bool(args.smoke)
    if smoke:
        args = _smoke_args(args)
    gpu = on_gpu()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    torch.manual_seed(args.seed)
    cases = [(op, n) for op in args.ops for n in args.rows]
    impls = ["tilegraph", *args.peers]
    started = time.perf_counter()
    with Reporter("merge", out_dir / "merge.json", COLUMNS, len(cases), run_meta(device, smoke)) as report:
        report.step("ceiling: device-to-device copy")
        copy = copy_bandwidth(device, 2**23 if smoke else 2**30, reps=3 if smoke else 30)
        report.payload["ceilings"]["copy"] = copy
        report.payload["shape"] = {k: getattr(args, k) for k in ("num_heads", "head_dim", "dtype", "num_states")}
        for op, rows in cases:
            if args.time_budget_s is not None and time.perf_counter() - started > args.time_budget_s:
                report.note(f"time budget spent: {op} N={rows} not run")
                report.advance()
                continue
            report.step(f"{op} N={rows}")
            for row in measure_case(make_case(op, rows, args, device), impls, copy["gbs"]):
                report.add(row, advance=False)
            report.advance()
    payload = report.payload
    plot_lines(payload["rows"], out_dir / "merge.png", x="rows", y="gbs", line="impl", panel="op",
               ceiling=("d2d copy", copy["gbs"]), title=f"merge ops on {payload['meta']['device']['name']}",
               xlabel="rows N (x heads)", ylabel="GB/s (states in + merged out)")  # fmt: skip
    return payload
