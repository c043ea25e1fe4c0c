"""``python -m tilegraph inspect-plan``: what the planner makes of a length mix, and what it costs.

    python -m tilegraph inspect-plan --lengths 32768,512x63 --num-qo-heads 32 --num-kv-heads 8 \\
        --head-dim 128 --page-size 16 [--num-ctas N] [--deterministic] [--json PATH]

Builds Settings just large enough for the batch (max_batch_size = requests, max_num_pages = pages
needed), plans it on the host (no kernels, no device) and prints tiles per CTA, balance, makespan
and the workspace bytes those Settings allocate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

LENGTHS_HELP = (
    "KV lengths in tokens, comma-separated; LEN or LENxCOUNT (COUNT requests of LEN tokens). "
    "'32768,512x63' is one 32k-token request and 63 of 512 tokens; 0 is an empty request"
)
H100_SMS = 132  # the grid inspect-plan assumes with no GPU here: an H100 SXM's SMs x the engine's CTAs per SM


def parse_lengths(text: str) -> list[int]:
    """``'32768,512x63'`` -> [32768, 512, ..., 512] (argparse type; errors say which item is wrong)."""
    lengths: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise argparse.ArgumentTypeError(f"empty item in {text!r} ({LENGTHS_HELP})")
        tokens_text, times, count_text = item.partition("x")
        try:
            tokens, count = int(tokens_text), int(count_text) if times else 1
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read {item!r}: expected LEN or LENxCOUNT with integers") from None
        if tokens < 0 or count < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: LEN must be >= 0 and COUNT >= 1")
        lengths.extend([tokens] * count)
    return lengths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilegraph inspect-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=parse_lengths, required=True, help=LENGTHS_HELP)
    parser.add_argument("--num-qo-heads", type=int, required=True)
    parser.add_argument("--num-kv-heads", type=int, required=True)
    parser.add_argument("--head-dim", type=int, required=True)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--num-ctas", type=int, default=None,
                        help=f"persistent CTA budget (default: BatchDecode's grid on this GPU; with no GPU an H100's "
                             f"{H100_SMS} SMs x the decode engine's CTAs per SM)")  # fmt: skip
    parser.add_argument("--deterministic", action="store_true", help="plan as Settings(deterministic=True)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return parser


def default_num_ctas(lengths: list[int], args: argparse.Namespace) -> tuple[int, str]:
    """BatchDecode's default grid for these Settings (its engine's CTAs per SM) on this GPU, else on an
    H100; and where the figure comes from."""
    import torch

    from tilegraph._device import SIMULATOR
    from tilegraph.decode import decode_ctas_per_sm, decode_engine_of, decode_num_ctas

    settings = settings_for(lengths, args, None)
    if not SIMULATOR and torch.cuda.is_available():
        return decode_num_ctas(settings, torch.device("cuda")), torch.cuda.get_device_name()
    per_sm = decode_ctas_per_sm(settings)
    return H100_SMS * per_sm, f"no GPU here: an H100's {H100_SMS} SMs x {per_sm} ({decode_engine_of(settings)} engine)"


def settings_for(lengths: list[int], args: argparse.Namespace, num_ctas: int | None) -> Any:
    from tilegraph import Settings

    pages = sum(-(-n // args.page_size) for n in lengths)
    return Settings(num_qo_heads=args.num_qo_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                    page_size=args.page_size, dtype=args.dtype, max_batch_size=len(lengths),
                    max_num_pages=max(pages, 1), num_ctas=num_ctas, deterministic=args.deterministic)  # fmt: skip


def inspect(lengths: list[int], args: argparse.Namespace, num_ctas: int) -> dict[str, Any]:
    """Plan ``lengths`` under Settings sized to fit; the numbers as plain data."""
    settings = settings_for(lengths, args, num_ctas)  # invalid shapes are reported before planning

    import torch

    from tilegraph.decode import decode_engine_of, decode_layout
    from tilegraph.planner.decode import plan_decode
    from tilegraph.planner.decode_prefill import plan_decode_prefill

    from .bench.common import page_table

    # BatchDecode's own layout and planner for these Settings (its engine decides both; num_ctas is set)
    engine = decode_engine_of(settings)
    layout = decode_layout(settings, torch.device("cpu"))
    kv_indptr, kv_indices, kv_last = page_table(lengths, args.page_size, np.random.default_rng(0))
    if engine == "tensor_cores":
        plan = plan_decode_prefill(layout, kv_indptr, kv_indices, kv_last, settings.max_num_pages, 1, allow_split=True)
    else:
        plan = plan_decode(layout, kv_indptr, kv_indices, kv_last, num_pages=settings.max_num_pages, serial=1)
    tiles_per_cta = np.asarray(plan.tiles_per_cta()).astype(int)
    return {
        "lengths": {"requests": len(lengths), "total_tokens": int(sum(lengths)), "max_tokens": int(max(lengths))},
        "settings": settings.model_dump(mode="json"),
        "num_ctas": num_ctas,
        "engine": engine,
        "plan": {
            "num_tiles": int(plan.num_tiles),
            "num_merges": int(getattr(plan, "num_merges", 0)),
            "balance": float(plan.balance),
            "makespan": float(plan.makespan),
            "anchors": _anchors(lengths, args.page_size, args.num_kv_heads, num_ctas),
        },
        "tiles_per_cta": tiles_per_cta.tolist(),
        "workspace_bytes": int(layout.workspace_nbytes),
        "plan_words": int(layout.plan_words),
        "tile_capacity": int(layout.tile_capacity),
    }


def _anchors(lengths: list[int], page_size: int, num_kv_heads: int, num_ctas: int) -> dict[str, dict[str, Any]] | None:
    """The reference schedulers (FlashInfer's, reimplemented in planner/anchors.py) on the same batch,
    under the same cost model; None when this checkout has no anchors."""
    try:
        from tilegraph.planner.anchors import anchors
    except ImportError:
        return None
    schedules = anchors(np.asarray(lengths, dtype=np.int64), page_size, num_kv_heads, num_ctas)
    return {a.name: {"balance": float(a.balance), "makespan": int(a.makespan), "num_tiles": int(a.num_tiles),
                     "chunk_tokens": a.chunk_tokens} for a in schedules}  # fmt: skip


def render(report: dict[str, Any], where: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    plan, lengths, s = report["plan"], report["lengths"], report["settings"]
    tiles = np.asarray(report["tiles_per_cta"])
    table = Table(title=f"decode plan: {lengths['requests']} requests, {lengths['total_tokens']} tokens "
                        f"(longest {lengths['max_tokens']}) on {report['num_ctas']} CTAs ({where})")  # fmt: skip
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("decode engine", report["engine"])
    table.add_row("tiles", str(plan["num_tiles"]))
    table.add_row("split (request, kv head) pairs merged", str(plan["num_merges"]))
    table.add_row("tiles per CTA min / median / max", f"{tiles.min()} / {np.median(tiles):.0f} / {tiles.max()}")
    table.add_row("balance", f"{plan['balance']:.3f}")
    table.add_row("makespan (KV-token cost units)", f"{plan['makespan']:.0f}")
    for name, anchor in (plan["anchors"] or {}).items():
        table.add_row(f"{name}: balance / makespan / tiles",
                      f"{anchor['balance']:.3f} / {anchor['makespan']} / {anchor['num_tiles']}")  # fmt: skip
    table.add_row("workspace bytes", f"{report['workspace_bytes']:,} ({report['workspace_bytes'] / 2**20:.2f} MiB)")
    console.print(table)
    if tiles.size <= 64:
        console.print(f"tiles per CTA: {tiles.tolist()}")
    else:
        counts = np.bincount(tiles)
        console.print("CTAs by tile count: " + ", ".join(f"{k} tiles: {c}" for k, c in enumerate(counts) if c))
    console.print(f"Settings(num_qo_heads={s['num_qo_heads']}, num_kv_heads={s['num_kv_heads']}, head_dim={s['head_dim']}, "
                  f"page_size={s['page_size']}, max_batch_size={s['max_batch_size']}, max_num_pages={s['max_num_pages']}, "
                  f"num_ctas={s['num_ctas']}, deterministic={s['deterministic']})", highlight=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 2
    from pydantic import ValidationError

    from tilegraph.errors import TilegraphError

    try:
        if args.num_ctas is not None:
            num_ctas, where = args.num_ctas, "--num-ctas"
        else:
            num_ctas, where = default_num_ctas(args.lengths, args)
        report = inspect(args.lengths, args, num_ctas)
    except (ValidationError, TilegraphError) as err:
        print(f"tilegraph inspect-plan: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    render(report, where)
    if args.json is not None:
        from .bench.common import write_json

        write_json(args.json, report)
    return 0
