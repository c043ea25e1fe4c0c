"""Command line: ``python -m tilegraph {demo,selfcheck,bench,compile-check}`` (also the ``tilegraph`` script)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tilegraph", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="plan and run a skewed decode batch, checked against a float64 reference")
    sub.add_parser("selfcheck", help="run each primitive and merge kernel once against numpy")
    bench = sub.add_parser("bench", help="benchmarks (measurements, not tests)")
    bench.add_argument("suite", choices=["plan"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    check = sub.add_parser("compile-check", help="compile every kernel for sm_80/sm_90 without a GPU")
    check.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import main as demo

        return demo()
    if args.command == "selfcheck":
        from .selfcheck import main as selfcheck

        return selfcheck()
    if args.command == "bench":
        from .bench.plan import main as bench_plan

        bench_plan(args.rest)
        return 0
    if args.command == "compile-check":
        import os
        import subprocess

        env = dict(os.environ, TILEGRAPH_SIMULATOR="0")
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        cmd = [sys.executable, "-m", "tilegraph.kernels.compile_check", *args.rest]
        return subprocess.call(cmd, env=env)
    return 2


if __name__ == "__main__":
    sys.exit(main())
