"""``python -m tilegraph bench cascade``: parallel generation, cascade attention vs flat decode.

B requests decode one token each after sampling from one shared prompt of P tokens (default: 64
requests, a 4k-token prompt); each has its own continuation of 1..``--suffix-max`` tokens. Cascade
(2 levels: the prompt once for the group, then each continuation) against flat ``BatchDecode``
over each request's whole page table (the prompt's pages referenced by every request). Bytes
counted: K and V read (q and out are negligible here), as each plan says. Modes: ``eager`` (each
call launches) and ``graph`` (one CUDA graph per input set, replayed). KV caches rotated beyond the
L2 (a 4k prompt's KV fits in an H100's L2: without rotation flat decode's re-reads would be L2
hits). CUDA-event medians after warm-up; random K/V/q, never zeros; the cascade's output is
checked against flat decode's.

``main(argv) -> rows`` runs it outside the CLI (it refuses on the simulator unless ``--smoke``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .common import (
    EXIT_NEEDS_GPU,
    Reporter,
    choice_list,
    int_list,
    needs_gpu_message,
    on_gpu,
    plot_lines,
    rotation_sets,
    run_meta,
    stats_us,
    time_calls_us,
)

NEEDS_GPU = True
MODES = ("eager", "graph")
COLUMNS = [
    ("prefix_len", "prompt", ""), ("batch_size", "B", ""), ("mode", "mode", ""), ("impl", "impl", ""),
    ("median_us", "median µs", ".1f"), ("kv_mib", "KV MiB read", ".1f"), ("gbs", "GB/s", ".0f"),
    ("speedup", "vs flat", ".2f"), ("rel_err", "rel err", ".1e"), ("skipped", "skipped", ""),
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int_list, default=[64], help="requests sharing the prompt, comma-separated")
    parser.add_argument("--prefix-lens", type=int_list, default=[4096, 1024, 16384], help="prompt tokens, comma-separated (the first runs first)")
    parser.add_argument("--suffix-max", type=int, default=128, help="each request's own tokens: uniform in [1, this]")
    parser.add_argument("--modes", type=choice_list(MODES), default=list(MODES))
    parser.add_argument("--num-qo-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)


@dataclass
class CascadeCase:
    """One batch: its settings, page tables planned into both attentions, rotated KV caches."""

    prefix_len: int
    batch_size: int
    settings: Any  # tilegraph.Settings
    cascade: Any  # tilegraph.CascadeAttention, planned
    flat: Any  # tilegraph.BatchDecode, planned
    plan: Any  # tilegraph.cascade.CascadePlan
    q: torch.Tensor  # [B, Hq, D]
    caches: list[torch.Tensor]  # [num_pages, 2, page_size, Hkv, D] each, rotated
    reps: int
    warmup: int


def page_tables(prefix_len: int, suffix_lens: np.ndarray, page_size: int) -> tuple[list[Any], tuple[np.ndarray, ...], int]:
    """(cascade LevelTables, flat (kv_indptr, kv_indices, kv_last_page_len), pages used). The prompt
    fills pages 0.. (whole pages: ``prefix_len`` is rounded up to a page), each continuation the
    next ones."""
    from tilegraph.cascade import LevelTable

    batch = len(suffix_lens)
    prompt = np.arange(-(-prefix_len // page_size), dtype=np.int32)
    counts = -(-suffix_lens // page_size)
    own_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    own = (len(prompt) + np.arange(own_indptr[-1])).astype(np.int32)
    last = ((suffix_lens - 1) % page_size + 1).astype(np.int32)
    levels = [
        LevelTable(np.array([0, batch], np.int32), np.array([0, len(prompt)], np.int32), prompt, np.array([page_size], np.int32)),
        LevelTable(np.arange(batch + 1, dtype=np.int32), own_indptr, own, last),
    ]
    flat_indptr = np.concatenate([[0], np.cumsum(counts + len(prompt))]).astype(np.int32)
    flat = np.concatenate([np.concatenate([prompt, own[own_indptr[r] : own_indptr[r + 1]]]) for r in range(batch)])
    return levels, (flat_indptr, flat.astype(np.int32), last), len(prompt) + int(own_indptr[-1])


def make_case(prefix_len: int, batch: int, args: argparse.Namespace, device: torch.device, rng: np.random.Generator) -> CascadeCase:
    import tilegraph
    from tilegraph.cascade import CascadeAttention

    page_size = args.page_size
    prefix_len = -(-prefix_len // page_size) * page_size  # the flat tables need whole prompt pages
    suffix_lens = rng.integers(1, args.suffix_max + 1, batch)
    levels, flat_tables, num_pages = page_tables(prefix_len, suffix_lens, page_size)
    settings = tilegraph.Settings(
        num_qo_heads=args.num_qo_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim, page_size=page_size,
        dtype=args.dtype, max_batch_size=batch, max_num_pages=num_pages, max_page_refs=len(flat_tables[1]),
        max_num_tokens=batch, num_ctas=None if device.type == "cuda" else 2,
    )  # fmt: skip
    cascade = CascadeAttention(settings, num_levels=2, device=device)
    flat = tilegraph.BatchDecode(settings, device=device)
    plan = cascade.plan(levels)
    flat.plan(*flat_tables)
    shape = (num_pages, 2, page_size, args.num_kv_heads, args.head_dim)
    set_bytes = int(np.prod(shape)) * settings.torch_dtype.itemsize
    num_sets = rotation_sets(set_bytes, device) if device.type == "cuda" else 1
    caches = [torch.randn(shape, device=device).to(settings.torch_dtype) for _ in range(num_sets)]
    q = torch.randn(batch, args.num_qo_heads, args.head_dim, device=device).to(settings.torch_dtype)
    return CascadeCase(prefix_len, batch, settings, cascade, flat, plan, q, caches, args.reps, args.warmup)


# ---- the two modes: each returns call(i) for input set i % len(caches), and the output it writes --


def eager_calls(case: CascadeCase, attention: Any) -> tuple[Callable[[int], Any], torch.Tensor]:
    out = torch.empty_like(case.q)
    caches = case.caches
    return (lambda i: attention.run(case.q, caches[i % len(caches)], out=out)), out


def graph_calls(case: CascadeCase, attention: Any) -> tuple[Callable[[int], Any], torch.Tensor]:
    """One captured graph per input set (the plan is uploaded once, before the captures)."""
    from tilegraph.graphs.standin import SimulatedGraph

    out = torch.empty_like(case.q)
    gpu = case.q.device.type == "cuda"
    graphs = []
    for cache in case.caches:
        attention.run(case.q, cache, out=out)  # warm-up: compiles, uploads the plan
        graph = torch.cuda.CUDAGraph() if gpu else SimulatedGraph()
        attention.graph_set_capturing(True)
        try:
            with torch.cuda.graph(graph) if gpu else graph.capture():
                attention.run(case.q, cache, out=out)
        finally:
            attention.graph_set_capturing(False)
        graphs.append(graph)
    return (lambda i: graphs[i % len(graphs)].replay()), out


def measure_case(case: CascadeCase, modes: list[str]) -> list[dict[str, Any]]:
    from tilegraph.serving.reference import relative_error

    gpu = case.q.device.type == "cuda"
    base = {"prefix_len": case.prefix_len, "batch_size": case.batch_size, "input_sets": len(case.caches),
            "suffix_tokens": int(case.plan.request_kv_len[-1].sum())}  # fmt: skip
    rows = []
    for mode in modes:
        make = eager_calls if mode == "eager" else graph_calls
        results: dict[str, tuple[dict[str, Any], torch.Tensor]] = {}
        for impl, attention in (("flat-decode", case.flat), ("cascade", case.cascade)):
            call, out = make(case, attention)
            results[impl] = (stats_us(time_calls_us(call, case.reps, case.warmup, gpu)), out)
        flat_stats, flat_out = results["flat-decode"]
        for impl, (s, out) in results.items():
            kv_bytes = case.plan.kv_bytes(case.settings, flat=impl == "flat-decode")
            rows.append({**base, "mode": mode, "impl": impl, "series": f"{impl} ({mode})", **s, "kv_bytes": kv_bytes,
                         "kv_mib": kv_bytes / 2**20, "gbs": kv_bytes / (s["median_us"] * 1e3),
                         "speedup": flat_stats["median_us"] / s["median_us"],
                         "rel_err": relative_error(out, flat_out) if impl == "cascade" else None})  # fmt: skip
    return rows


def _smoke_args(args: argparse.Namespace) -> argparse.Namespace:
    tiny = dict(batch_sizes=[4], prefix_lens=[16], suffix_max=5, num_qo_heads=4, num_kv_heads=2, head_dim=16,
                page_size=4, dtype="float16", reps=1, warmup=0)  # fmt: skip
    return argparse.Namespace(**{**vars(args), **tiny})


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run the suite; writes ``cascade.json`` (after every case) and ``cascade.png`` into ``out_dir``."""
    smoke = bool(args.smoke)
    if smoke:
        args = _smoke_args(args)
    device = torch.device("cuda") if on_gpu() else torch.device("cpu")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cases = [(p, b) for b in args.batch_sizes for p in args.prefix_lens]
    started = time.perf_counter()
    with Reporter("cascade", out_dir / "cascade.json", COLUMNS, len(cases), run_meta(device, smoke)) as report:
        report.payload["shape"] = {k: getattr(args, k) for k in ("num_qo_heads", "num_kv_heads", "head_dim", "page_size",
                                                                 "dtype", "suffix_max")}  # fmt: skip
        for prefix_len, batch in cases:
            if args.time_budget_s is not None and time.perf_counter() - started > args.time_budget_s:
                report.note(f"time budget spent: prompt {prefix_len} x B={batch} not run")
                report.advance()
                continue
            report.step(f"prompt {prefix_len} tokens, {batch} requests")
            try:
                rows = measure_case(make_case(prefix_len, batch, args, device, rng), args.modes)
            except Exception as err:  # one failing case must not cost the rest of the suite
                rows = [{"prefix_len": prefix_len, "batch_size": batch, "skipped": f"error: {type(err).__name__}: {str(err)[:300]}"}]
            for row in rows:
                report.add(row, advance=False)
            report.advance()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    payload = report.payload
    plot_lines(payload["rows"], out_dir / "cascade.png", x="prefix_len", y="median_us", line="series", panel="batch_size",
               title=f"parallel generation on {payload['meta']['device']['name']}", xlabel="shared prompt tokens",
               ylabel="attention µs per step (median)")  # fmt: skip
    return payload


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse ``argv`` (the CLI's options: --out, --smoke, --seed, --time-budget-s, and this suite's),
    run, return the rows. On the simulator without ``--smoke``: a message and SystemExit(3)."""
    from .cli import _suite_parser

    parser = _suite_parser("cascade")
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.smoke and not on_gpu():
        print(needs_gpu_message("bench cascade") + "; or pass --smoke for one tiny host-timed case.", file=sys.stderr)
        raise SystemExit(EXIT_NEEDS_GPU)
    return run(args, args.out)["rows"]


if __name__ == "__main__":
    main()
