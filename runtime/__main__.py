"""Command line: ``python -m tilegraph {demo,selfcheck,bench,gpu-run,inspect-plan,compile-check}``
(also the ``tilegraph`` script). ``tilegraph COMMAND --help`` describes each."""

from __future__ import annotations

import argparse
import os
import sys

# commands that parse their own arguments: name -> (module, help)
DELEGATED = {
    "demo": ("tilegraph.serving.demo", "continuous-batching Llama-style decode loop, eager vs CUDA graphs (simulator on a CPU)"),
    "bench": ("tilegraph.tools.bench.cli", "benchmarks (measurements, not tests): plan, decode, merge, ..."),
    "gpu-run": ("tilegraph.tools.gpu_run", "everything a lent GPU should run, time-boxed, into one folder"),
    "inspect-plan": ("tilegraph.tools.inspect_plan", "plan a length mix on the host: tiles per CTA, balance, workspace bytes"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilegraph", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("selfcheck", help="run each primitive and merge kernel once against numpy")
    for name, (_, help_text) in DELEGATED.items():
        delegated = sub.add_parser(name, help=help_text, add_help=False)
        delegated.add_argument("rest", nargs=argparse.REMAINDER)
    check = sub.add_parser("compile-check", help="compile every kernel for sm_80/sm_90 without a GPU")
    check.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _drop_source_tree() -> None:
    """Run from a tilegraph checkout, ``python -m`` puts it first on sys.path, where its source folders
    (kernels/, planner/, graphs/; installed as tilegraph.*) shadow PyPI packages of the same name
    (transformers >= 5.25 imports ``kernels``): such entries are dropped."""
    def is_checkout(entry: str) -> bool:
        return all(os.path.isfile(os.path.join(entry or os.curdir, *parts))
                   for parts in (("kernels", "__init__.py"), ("runtime", "__main__.py")))  # fmt: skip

    sys.path[:] = [entry for entry in sys.path if not is_checkout(entry)]


def main(argv: list[str] | None = None) -> int:
    _drop_source_tree()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    if argv and argv[0] == "compile-check":  # its options go to it whole (argparse's REMAINDER drops --flags)
        return _compile_check(argv[1:])
    args = _parser().parse_args(argv)

    if args.command == "selfcheck":
        from .tools.selfcheck import main as selfcheck

        return selfcheck()
    if args.command == "compile-check":
        return _compile_check(args.rest)
    return 2


def _compile_check(rest: list[str]) -> int:
    """The driverless compile check, in a process without the simulator (compile_ptx needs that)."""
    import os
    import subprocess

    env = dict(os.environ, TILEGRAPH_SIMULATOR="0")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    return subprocess.call([sys.executable, "-m", "tilegraph.tools.compile_check", *rest], env=env)


if __name__ == "__main__":
    sys.exit(main())
