"""``python -m tilegraph bench <suite> [--out DIR] [--smoke] [suite options]``.

Suites: ``plan`` (CPU), ``decode``, ``merge``, ``prefill``, ``cascade``, ``graphs``, ``hf`` (GPU). A suite
whose module this checkout lacks says it is not available yet (exit 2). A GPU suite's module
provides ``add_arguments(parser)`` and ``run(args, out_dir) -> payload``; ``plan`` is
``tilegraph.tools.bench.plan.main(argv) -> rows``. Each suite prints a table with a progress bar while
it runs and writes ``<suite>.json`` (rewritten after every case) and ``<suite>.png`` into ``--out``.

Exit codes: 0 done; 2 usage error or a suite that is not available yet; 3 a GPU suite on a
machine where kernels run on the simulator (``--smoke`` runs one tiny host-timed case there).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import EXIT_NEEDS_GPU, EXIT_OK, EXIT_USAGE, code_version, needs_gpu_message, on_gpu, plot_lines, write_json


@dataclass(frozen=True)
class SuiteInfo:
    summary: str
    needs_gpu: bool
    module: str

    @property
    def available(self) -> bool:
        """Whether this checkout has the suite's module (suites light up as they are written)."""
        if self.module in sys.modules:
            return True
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ModuleNotFoundError, ValueError):
            return False


SUITES: dict[str, SuiteInfo] = {
    "plan": SuiteInfo("CPU: planner cost and balance", False, "tilegraph.tools.bench.plan"),
    "decode": SuiteInfo("GPU: paged decode GB/s vs copy ceiling; SDPA, FlexAttention, FlashInfer peers", True, "tilegraph.tools.bench.decode"),
    "merge": SuiteInfo("GPU: merge_state / merge_states GB/s vs copy ceiling; torch, FlashInfer peers", True, "tilegraph.tools.bench.merge"),
    "prefill": SuiteInfo("GPU: batch prefill TFLOP/s vs bf16 matmul ceiling; flash SDPA (varlen, padded), FlexAttention peers", True, "tilegraph.tools.bench.prefill"),
    "cascade": SuiteInfo("GPU: shared-prefix cascade attention", True, "tilegraph.tools.bench.cascade"),
    "graphs": SuiteInfo("GPU: decoder step latency, eager vs CUDA-graph replay", True, "tilegraph.tools.bench.graphs"),
    "hf": SuiteInfo("GPU: transformers generate() with the tilegraph backend vs sdpa (tokens/s, token match)", True, "tilegraph.tools.bench.hf"),
}


def available() -> list[str]:
    return [name for name, info in SUITES.items() if info.available]


def _suite_list() -> str:
    lines = [f"  {name:<8} {info.summary}" + ("" if info.available else "  [not available yet]") for name, info in SUITES.items()]
    return "suites:\n" + "\n".join(lines)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilegraph bench",
        description="Benchmarks (measurements, not tests).",
        epilog=_suite_list() + "\n\n`tilegraph bench SUITE --help` lists a suite's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("suite", choices=list(SUITES), help="which suite to run")
    return parser


def _suite_parser(suite: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"tilegraph bench {suite}", description=SUITES[suite].summary)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / suite, help="output folder (default bench-results/SUITE)")
    parser.add_argument("--smoke", action="store_true", help="one tiny case, host-timed: checks the suite runs (no real numbers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget-s", type=float, default=None, help="stop starting new cases after this long")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except SystemExit as done:  # argparse's --help and usage errors
        return done.code if isinstance(done.code, int) else EXIT_USAGE


def _main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-") or argv[0] not in SUITES:
        _top_parser().parse_args(argv[:1] or argv)  # prints help, or the usage error (exit 2)
        return EXIT_USAGE
    suite, rest = argv[0], argv[1:]
    info = SUITES[suite]
    if not info.available:
        print(f"tilegraph bench: suite {suite!r} is not available yet (available: {', '.join(available())})", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(info.module)
    if not hasattr(module, "run"):  # the plan benchmark: main(argv) -> rows
        return _run_plan(module, rest)
    parser = _suite_parser(suite)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    if info.needs_gpu and not args.smoke and not on_gpu():
        print(needs_gpu_message(f"bench {suite}") + "; or pass --smoke for one tiny host-timed case that only checks the suite runs.",
              file=sys.stderr)  # fmt: skip
        return EXIT_NEEDS_GPU
    payload = module.run(args, args.out)
    _print_written(args.out, suite, payload)
    return EXIT_OK


def _run_plan(plan: Any, rest: list[str]) -> int:
    """The CPU plan benchmark (``tilegraph.tools.bench.plan.main(argv) -> rows``): its rows, then JSON and
    a plot. ``--out`` is ours; every other argument goes to it."""
    import torch

    from .common import run_meta

    parser = argparse.ArgumentParser(prog="tilegraph bench plan", add_help=False)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "plan")
    args, plan_argv = parser.parse_known_args(rest)

    rows = plan.main(plan_argv) or []
    payload = {"suite": "plan", "meta": run_meta(torch.device("cpu"), "--smoke" in plan_argv), "rows": rows, "argv": plan_argv}
    write_json(args.out / "plan.json", payload)
    _plot_plan(rows, args.out / "plan.png")
    _print_written(args.out, "plan", payload)
    return EXIT_OK


def _plot_plan(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Plan time over batch size, one line per length mix (keys found in the rows)."""
    if not rows:
        return None
    keys = list(rows[0])
    x = next((k for k in ("batch_size", "B", "requests") if k in keys), None)
    y = next((k for k in keys if k.endswith("_us") and "median" in k), None) or next((k for k in keys if k.endswith("_us")), None)
    line = next((k for k in ("mix", "case", "name", "impl") if k in keys), None)
    if x is None or y is None:
        return None
    if line is None:
        rows, line = [{**r, "_line": "plan"} for r in rows], "_line"
    return plot_lines(rows, path, x=x, y=y, line=line, title="plan (host) time", xlabel=x, ylabel=y)


def _print_written(out: Path, suite: str, payload: dict[str, Any]) -> None:
    from rich.console import Console

    files = ", ".join(str(out / f"{suite}.{ext}") for ext in ("json", "png") if (out / f"{suite}.{ext}").exists())
    Console().print(f"[bold]bench {suite}[/] ({code_version()}): {len(payload.get('rows', []))} rows -> {files}")
