"""``python -m tilegraph bench plan``: host cost and balance of decode planning (CPU only, no kernels).

For every length mix (uniform, skewed, ShareGPT-like log-normal) and batch size: microseconds per
plan (median and p90 over many calls after a warm-up, garbage collection paused), the plan's balance
(ideal / makespan, planner/plan.py) and the two anchors' balance on the same batch
(planner/anchors.py). ``--page-table``: ``host`` times ``plan_decode`` (int32 CPU torch tensors,
kv_indices validated and copied), ``device`` ``plan_decode_device`` (kv_indices stays on the device:
only kv_indptr / kv_last_page_len are read) and ``block_table`` ``plan_decode_block_table`` (only
per-request lengths). ``--stage`` adds what ``BatchDecode.plan`` does next: staging the plan's live
words into the workspace's upload buffer. Settings are sized to fit each batch, or to
``--capacity-pages`` pages of pool and page references (the cost should not depend on it).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tilegraph.planner.anchors import anchors
from tilegraph.planner.decode import plan_decode, plan_decode_block_table, plan_decode_device
from tilegraph.planner.layout import DecodeLayout
from tilegraph.settings import Settings

from .common import MIXES, int_list, length_mix, page_table

DEFAULT_BATCH_SIZES = [1, 16, 256, 4096]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tilegraph bench plan", description=__doc__)
    parser.add_argument("--batch-sizes", type=int_list, default=DEFAULT_BATCH_SIZES)
    parser.add_argument("--mixes", type=lambda s: [m for m in s.split(",") if m], default=list(MIXES))
    parser.add_argument("--num-ctas", type=int, default=132 * 2, help="persistent CTAs (default: 132 SMs x 2)")
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4, help="query heads per kv head")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--page-table", choices=("host", "device", "block_table"), default="host",
                        help="where the kernels read page ids: planned from the host table, or lengths only")
    parser.add_argument("--capacity-pages", type=int, default=None,
                        help="Settings.max_num_pages / max_page_refs (default: the batch's own pages)")
    parser.add_argument("--stage", action="store_true", help="also stage the plan's live words (BatchDecode.plan)")
    parser.add_argument("--time-s", type=float, default=0.5, help="timing budget per case (seconds)")
    parser.add_argument("--smoke", action="store_true", help="a few calls per case (checks that it runs)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    return parser.parse_args(argv)


def _time_us(call: Any, budget_s: float, max_reps: int) -> tuple[list[float], int]:
    """Per-call microseconds after a warm-up, until ``budget_s`` or ``max_reps``."""
    for _ in range(min(20, max_reps)):
        call()
    samples: list[float] = []
    gc.disable()
    try:
        deadline = time.perf_counter() + budget_s
        while len(samples) < max_reps and (len(samples) < 5 or time.perf_counter() < deadline):
            start = time.perf_counter_ns()
            call()
            samples.append((time.perf_counter_ns() - start) / 1e3)
    finally:
        gc.enable()
    return samples, len(samples)


def run_case(mix: str, batch_size: int, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    lengths = length_mix(mix, batch_size, rng)
    kv_indptr, kv_indices, kv_last_page_len = page_table(lengths, args.page_size, rng)
    pages = max(int(kv_indptr[-1]), 1, args.capacity_pages or 0)
    settings = Settings(num_qo_heads=args.num_kv_heads * args.group_size, num_kv_heads=args.num_kv_heads,
                        head_dim=128, page_size=args.page_size, max_batch_size=batch_size, max_num_pages=pages,
                        num_ctas=args.num_ctas, deterministic=args.deterministic)  # fmt: skip
    layout = DecodeLayout.from_settings(settings, args.num_ctas)
    planner = _planner(args.page_table, layout, lengths, (kv_indptr, kv_indices, kv_last_page_len), pages)
    stage = _stager(layout) if args.stage else None

    def call() -> Any:
        plan = planner()
        if stage is not None:
            stage(plan)
        return plan

    plan = call()
    samples, reps = _time_us(call, 0.0 if args.smoke else args.time_s, 5 if args.smoke else 20000)
    theirs = {a.name: a for a in anchors(np.asarray(lengths, dtype=np.int64), args.page_size, args.num_kv_heads, args.num_ctas)}
    decode, persistent = theirs["flashinfer-decode"], theirs["flashinfer-persistent"]
    return {
        "mix": mix,
        "batch_size": batch_size,
        "page_table": args.page_table,
        "capacity_pages": pages,
        "plan_words": layout.plan_words,
        "staged": bool(args.stage),
        "plan_us_median": float(np.median(samples)),
        "plan_us_p90": float(np.percentile(samples, 90)),
        "reps": reps,
        "num_ctas": args.num_ctas,
        "num_kv_heads": args.num_kv_heads,
        "kv_tokens": int(sum(lengths)),
        "deterministic": args.deterministic,
        "num_tiles": plan.num_tiles,
        "num_merges": plan.num_merges,
        "makespan": plan.makespan,
        "balance": plan.balance,
        "flashinfer_decode_makespan": decode.makespan,
        "flashinfer_decode_balance": decode.balance,
        "flashinfer_persistent_makespan": persistent.makespan,
        "flashinfer_persistent_balance": persistent.balance,
    }


def _planner(page_table: str, layout: DecodeLayout, lengths: Any, table: tuple[np.ndarray, ...], pages: int) -> Any:
    """A no-argument call planning the batch the ``page_table`` way."""
    kv_indptr, kv_indices, kv_last_page_len = (torch.from_numpy(a) for a in table)
    if page_table == "host":
        return lambda: plan_decode(layout, kv_indptr, kv_indices, kv_last_page_len, num_pages=pages)
    if page_table == "device":
        num_indices = int(kv_indices.numel())  # an engine knows its kv_indices buffer's size: not timed
        return lambda: plan_decode_device(layout, kv_indptr, kv_last_page_len, num_indices, num_pages=pages)
    seq_lens = torch.tensor(np.asarray(lengths), dtype=torch.int32)
    max_blocks = max(int(np.diff(table[0]).max(initial=0)), 1)
    span = max_blocks * len(lengths)
    return lambda: plan_decode_block_table(layout, seq_lens, max_blocks, max_blocks, span, num_pages=pages)


def _stager(layout: DecodeLayout) -> Any:
    """What BatchDecode.plan does after planning: the plan's live words into a host upload buffer."""
    from tilegraph.workspace import Workspace

    workspace = Workspace(layout, torch.device("cpu"))
    return lambda plan: workspace.stage_ranges(plan.buffer, plan.live_ranges())


def render(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    first = rows[0]
    title = (f"decode plan on the host ({first['page_table']} page table{', staged' if first['staged'] else ''}, "
             f"capacity {first['capacity_pages']} pages): {first['num_ctas']} CTAs, {first['num_kv_heads']} kv heads"
             + (", deterministic" if first["deterministic"] else ""))  # fmt: skip
    table = Table(title=title)
    for column in ("mix", "B", "µs median", "µs p90", "tiles", "merges", "balance", "FI decode", "FI persistent"):
        table.add_column(column, justify="left" if column == "mix" else "right")
    for r in rows:
        table.add_row(r["mix"], str(r["batch_size"]), f"{r['plan_us_median']:.1f}", f"{r['plan_us_p90']:.1f}",
                      str(r["num_tiles"]), str(r["num_merges"]), f"{r['balance']:.3f}",
                      f"{r['flashinfer_decode_balance']:.3f}", f"{r['flashinfer_persistent_balance']:.3f}")  # fmt: skip
    Console().print(table)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parse(argv)
    unknown = [m for m in args.mixes if m not in MIXES]
    if unknown:
        raise SystemExit(f"unknown mix {', '.join(unknown)}: choose from {', '.join(MIXES)}")
    rng = np.random.default_rng(0)
    rows = [run_case(mix, batch_size, args, rng) for mix in args.mixes for batch_size in args.batch_sizes]
    render(rows)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
