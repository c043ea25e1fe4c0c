"""Driverless GPU compile check: every kernel module's ``gpu_compile_specs()`` for each compute capability.

    python -m tilegraph.tools.compile_check [--json PATH] [--cc 80,90] [--sample-cc 80] [--only SUBSTR] [--module NAME]

    python -m tilegraph.tools.compile_check --perf [--perf-json PATH]

Each spec is compiled to PTX with ``numba.cuda.compile_ptx`` (NVVM from the pip CUDA 13 toolkit) and
assembled with nvJitLink, whose info log gives registers, spill stores/loads, stack, local and shared
memory. Every cubin is disassembled with ``nvdisasm`` (pip ``nvidia-cuda-nvdisasm``, the test extra)
and its SASS checked for the instructions the PTX expectations should become (``LDG.E.128``,
``SHFL``, ``MUFU.EX2``, ``HMMA``), read into a performance record (``kernel_profile``: counts, the
K/V loop, occupancy, the model's predictions) and held to its family's budgets
(``perf_budgets.json``). A (spec, cc) passes when it compiles, every expected PTX substring and SASS
form is present, nothing spills and no budget is broken (expected-to-fail budgets only show).
``--perf`` prints the predicted-performance table and the decode step model; ``--perf-json``
writes them. ``--sample-cc 80`` compiles only each module's representative spec (the first it
lists, or the first ``--only`` keeps) at sm_80 and every spec at the other ``--cc`` values: the default test tier's check (sm_90
carries the performance budgets); the slow tier compiles the full sm_80 set module by module.

Must run without the simulator (``compile_ptx`` does not exist there). Because ``python -m`` imports
``tilegraph`` (which may turn the simulator on) before this module runs, ``main`` re-executes the
command with ``TILEGRAPH_SIMULATOR=0`` when the simulator was chosen automatically, and fails when
``TILEGRAPH_SIMULATOR`` is set and the simulator is on all the same.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from tilegraph._device import SIMULATOR

from tilegraph.kernels.compile_spec import CompileSpec

from . import budgets as budget_rules
from . import kernel_profile
from .sass import disassemble, find_nvdisasm  # noqa: F401  (find_nvdisasm: part of this module's API)

NVDISASM_MISSING = "nvdisasm not found: pip install nvidia-cuda-nvdisasm (CUDA 13 line; tilegraph's test extra)"

# Adding a kernel family to the check = adding its module name here.
KERNEL_MODULES: tuple[str, ...] = (
    "tilegraph.kernels.selftest",
    "tilegraph.kernels.merge",
    "tilegraph.kernels.decode",
    "tilegraph.kernels.decode_pipeline",
    "tilegraph.kernels.append",
    "tilegraph.kernels.prefill",
    "tilegraph.kernels.prefill_mma",
)
DEFAULT_CCS: tuple[tuple[int, int], ...] = ((8, 0), (9, 0))

# PTX expectation prefix -> SASS regex it should turn into (checked only when nvdisasm is found)
SASS_FOR_PTX: tuple[tuple[str, str], ...] = (
    ("ld.global.nc.v4", r"LDG\.E\.128\b"),
    ("shfl.sync.bfly", r"SHFL\.BFLY\b"),
    ("shfl.sync.idx", r"SHFL\.IDX\b"),
    ("ex2.approx", r"MUFU\.EX2\b"),
    ("max.NaN.f32", r"FMNMX\.NAN\b"),
    ("mma.sync.aligned.m16n8k16.row.col.f32.bf16", r"HMMA\.16816\.F32\.BF16\s"),
    ("mma.sync.aligned.m16n8k16.row.col.f32.f16", r"HMMA\.16816\.F32\s"),
)


@dataclass
class Record:
    """One (spec, cc) result; -1 = not known (not compiled, or missing from the nvJitLink log)."""

    module: str
    spec: str
    cc: str
    compiled: bool = False
    error: str = ""
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    lmem: int = -1
    smem: int = -1  # shared bytes a CTA takes: the linker log's static ones plus the spec's dynamic ones
    compile_s: float = 0.0
    sass_s: float = 0.0  # nvdisasm + SASS analysis (overlaps the next compile)
    expect: dict[str, bool] = field(default_factory=dict)
    sass: dict[str, bool] | None = None  # expected PTX substring -> its SASS form found (None: not checked)
    perf: dict[str, Any] | None = None  # kernel_profile.profile(...) of the SASS
    budget: list[dict[str, Any]] = field(default_factory=list)  # budgets.check(...) results

    @property
    def ok(self) -> bool:
        return (
            self.compiled
            and not self.error
            and (self.spill_stores == 0 and self.spill_loads == 0 or budget_rules.spills_expected(self.budget))
            and all(self.expect.values())
            and all((self.sass or {}).values())
            and not budget_rules.failed(self.budget)
        )

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# ---- compile and assemble -------------------------------------------------------------------------


def assemble(ptx: str, cc: tuple[int, int]) -> tuple[bytes, str]:
    """PTX -> (cubin, nvJitLink info log) for sm_<cc>."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        try:
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as exc:
            log = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, log)
            raise RuntimeError(f"nvJitLink: {exc}: {log.rstrip(bytes(1)).decode(errors='replace')}") from None
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
        return bytes(cubin), log.rstrip(bytes(1)).decode(errors="replace")
    finally:
        nvjitlink.destroy(handle)


def _log_max(pattern: str, log: str) -> int:
    values = [int(v) for v in re.findall(pattern, log, flags=re.IGNORECASE)]
    return max(values) if values else -1


def parse_resources(log: str) -> dict[str, int]:
    """Registers, spills, stack and lmem from an nvJitLink ``-verbose`` info log (max over entries)."""
    return {
        "registers": _log_max(r"used (\d+) registers", log),
        "spill_stores": _log_max(r"(\d+) bytes spill stores", log),
        "spill_loads": _log_max(r"(\d+) bytes spill loads", log),
        "stack": _log_max(r"(\d+) bytes stack frame", log),
        "lmem": _log_max(r"(\d+) bytes lmem", log),
        "smem": _log_max(r"(\d+) bytes smem", log),
    }


def sass_expectations(expect: tuple[str, ...]) -> dict[str, str]:
    """SASS regex for each expected PTX substring that has a known SASS form."""
    out = {}
    for ptx in expect:
        for prefix, sass in SASS_FOR_PTX:
            if ptx.startswith(prefix):
                out[ptx] = sass
                break
    return out


def _one_line(exc: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}")  # numba highlights its errors
    return " ".join(text.split())[:300]


def compile_spec(module: str, spec: CompileSpec, cc: tuple[int, int]) -> tuple[Record, bytes | None]:
    """Compile and assemble one (spec, cc): the record (resources, PTX expectations) and the cubin."""
    from numba import cuda

    rec = Record(module=module, spec=spec.name, cc=f"sm_{cc[0]}{cc[1]}")
    start = time.perf_counter()
    try:
        ptx, _ = cuda.compile_ptx(spec.pyfunc, spec.signature, cc=cc, fastmath=spec.fastmath)
        cubin, log = assemble(ptx, cc)
    except Exception as exc:
        rec.error = _one_line(exc)
        rec.compile_s = time.perf_counter() - start
        return rec, None
    rec.compile_s = time.perf_counter() - start
    rec.compiled = True
    for key, value in parse_resources(log).items():
        setattr(rec, key, value)
    if spec.perf is not None and rec.smem >= 0:
        rec.smem += spec.perf.dynamic_shared_bytes
    if rec.registers < 0 or rec.spill_stores < 0:
        rec.error = "could not read registers/spills from the nvJitLink info log"
    rec.expect = {text: text in ptx for text in spec.expect}
    return rec, cubin


def check_sass(rec: Record, spec: CompileSpec, cubin: bytes, nvdisasm: str | None,
               rules: list[budget_rules.Rule]) -> Record:  # fmt: skip
    """SASS forms of the PTX expectations, the performance record and the budgets (thread-safe: no numba)."""
    if nvdisasm is None:
        rec.error = rec.error or NVDISASM_MISSING
        return rec
    start = time.perf_counter()
    try:
        text = disassemble(nvdisasm, cubin)
        patterns = sass_expectations(spec.expect)
        rec.sass = {ptx: re.search(p, text) is not None for ptx, p in patterns.items()}
        rec.perf = kernel_profile.profile(text, rec.cc, rec.registers, max(rec.smem, 0), spec.name, spec.perf)
    except Exception as exc:
        rec.error = rec.error or f"SASS analysis: {_one_line(exc)}"
        return rec
    rec.budget = [r.as_json() for r in budget_rules.check(rec.as_json(), rules)]
    rec.sass_s = time.perf_counter() - start
    return rec


def check_spec(module: str, spec: CompileSpec, cc: tuple[int, int], nvdisasm: str | None,
               rules: list[budget_rules.Rule] | None = None) -> Record:  # fmt: skip
    rec, cubin = compile_spec(module, spec, cc)
    if cubin is None:
        return rec
    return check_sass(rec, spec, cubin, nvdisasm, budget_rules.load() if rules is None else rules)


def collect(modules: tuple[str, ...], only: str | None) -> tuple[list[tuple[str, CompileSpec, bool]], list[Record]]:
    """(module, spec, representative) for the specs whose name contains ``only`` (representative: the
    first of them its module lists); a module that fails to list its specs -> a failed Record."""
    specs, failed = [], []
    for name in modules:
        try:
            module_specs = importlib.import_module(name).gpu_compile_specs()
        except Exception as exc:
            failed.append(Record(module=name, spec=f"{name}.gpu_compile_specs()", cc="-", error=_one_line(exc)))
            continue
        chosen = [s for s in module_specs if only is None or only in s.name]
        specs.extend((name, s, i == 0) for i, s in enumerate(chosen))
    return specs, failed


def run_check(
    modules: tuple[str, ...] = KERNEL_MODULES, ccs: tuple[tuple[int, int], ...] = DEFAULT_CCS, only: str | None = None,
    budgets_path: str | None = None, sample_ccs: tuple[tuple[int, int], ...] = (),
) -> list[Record]:
    """Check every (spec, cc); at a cc in ``sample_ccs`` only each module's representative spec."""
    if SIMULATOR:
        raise RuntimeError("the GPU compile check cannot run under the numba CUDA simulator")
    specs, records = collect(modules, only)
    nvdisasm = find_nvdisasm()
    rules = budget_rules.load(budgets_path)
    # nvdisasm (a subprocess) and the SASS analysis overlap the next compile
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: list[Record | Future[Record]] = []
        for module, spec, representative in specs:
            for cc in ccs:
                if cc in sample_ccs and not representative:
                    continue
                rec, cubin = compile_spec(module, spec, cc)
                pending.append(rec if cubin is None else pool.submit(check_sass, rec, spec, cubin, nvdisasm, rules))
        records.extend(p if isinstance(p, Record) else p.result() for p in pending)
    return records


# ---- command line -----------------------------------------------------------------------------------


def _missing(rec: Record) -> str:
    if rec.error:
        return rec.error
    missing = [k for k, v in rec.expect.items() if not v]
    missing += [f"SASS for {k}" for k, v in (rec.sass or {}).items() if not v]
    problems = ["missing: " + ", ".join(missing)] if missing else []
    if rec.spill_stores or rec.spill_loads:
        known = " (expected: see its budget)" if budget_rules.spills_expected(rec.budget) else ""
        problems.append(f"spills {rec.spill_stores}/{rec.spill_loads} bytes{known}")
    problems += budget_rules.failed(rec.budget)
    return "; ".join(problems)


def _n(value: int) -> str:
    return "-" if value < 0 else str(value)


def print_table(records: list[Record], sass_checked: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="GPU compile check", title_justify="left")
    for col in ("spec", "cc", "ok", "regs", "spill st/ld", "stack", "lmem", "sec", "sass", "problem"):
        table.add_column(col, no_wrap=col != "problem")
    for r in records:
        sass = "-" if r.sass is None else ("ok" if all(r.sass.values()) else "MISSING")
        table.add_row(
            escape(r.spec), r.cc, "[green]ok[/]" if r.ok else "[red]FAIL[/]", _n(r.registers),
            f"{_n(r.spill_stores)}/{_n(r.spill_loads)}", _n(r.stack), _n(r.lmem), f"{r.compile_s:.2f}", sass,
            escape(_missing(r)),
        )  # fmt: skip
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    failed = sum(not r.ok for r in records)
    total = sum(r.compile_s for r in records)
    sass_total = sum(r.sass_s for r in records)
    sass_note = "" if sass_checked else f" ({NVDISASM_MISSING})"
    for r in records:  # whole lines, never wrapped: CI logs and tests search them
        for message in budget_rules.failed(r.budget):
            console.print(escape(message), soft_wrap=True, highlight=False)
    console.print(f"{len(records) - failed} passed, {failed} failed; compile {total:.1f} s, SASS {sass_total:.1f} s{sass_note}")


def _parse_ccs(text: str) -> tuple[tuple[int, int], ...]:
    ccs = []
    for item in text.split(","):
        item = item.strip().removeprefix("sm_")
        if not item.isdigit() or len(item) < 2:
            raise argparse.ArgumentTypeError(f"--cc: {item!r} is not a compute capability like 80 or 90")
        ccs.append((int(item[:-1]), int(item[-1])))
    return tuple(ccs)


def _leave_simulator(argv: list[str]) -> None:
    """Re-run without the simulator unless TILEGRAPH_SIMULATOR was set (then: fail, it was forced).

    Without TILEGRAPH_SIMULATOR, ``import tilegraph`` picked the simulator itself (and set
    NUMBA_ENABLE_CUDASIM=1 in this process), so the re-run drops NUMBA_ENABLE_CUDASIM."""
    if not SIMULATOR:
        return
    if "TILEGRAPH_SIMULATOR" in os.environ:
        raise SystemExit(
            "compile_check: the numba CUDA simulator is on in this process (TILEGRAPH_SIMULATOR="
            f"{os.environ['TILEGRAPH_SIMULATOR']}, NUMBA_ENABLE_CUDASIM={os.environ.get('NUMBA_ENABLE_CUDASIM')}) "
            "and compile_ptx does not exist there: run it with TILEGRAPH_SIMULATOR=0 and without NUMBA_ENABLE_CUDASIM"
        )
    env = dict(os.environ, TILEGRAPH_SIMULATOR="0")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tilegraph.tools.compile_check", *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m tilegraph.tools.compile_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", metavar="PATH", help="write every record as JSON")
    parser.add_argument("--cc", type=_parse_ccs, default=DEFAULT_CCS, help="compute capabilities, e.g. 80,90")
    parser.add_argument("--sample-cc", type=_parse_ccs, default=(), metavar="CCS",
                        help="at these of the --cc values only each module's representative (first) spec")
    parser.add_argument("--only", metavar="SUBSTR", help="only specs whose name contains SUBSTR")
    parser.add_argument(
        "--module", action="append", metavar="NAME", help="check these modules instead of KERNEL_MODULES (repeatable)"
    )
    parser.add_argument("--perf", action="store_true", help="print the predicted-performance table and the decode step model")
    parser.add_argument("--perf-json", metavar="PATH", help="write the --perf numbers as JSON (implies --perf)")
    parser.add_argument("--budgets", metavar="PATH", help=f"budget file (default: {budget_rules.BUDGETS_PATH.name} of this package)")
    args = parser.parse_args(argv)
    _leave_simulator(argv)
    modules = tuple(args.module) if args.module else KERNEL_MODULES
    records = run_check(modules, args.cc, args.only, args.budgets, args.sample_cc)
    if not records:
        print(f"compile_check: no spec matched --only {args.only!r} in {', '.join(modules)}", file=sys.stderr)
        return 2
    print_table(records, sass_checked=find_nvdisasm() is not None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_json() for r in records], f, indent=1)
    if args.perf or args.perf_json:
        print_perf([r.as_json() for r in records], args.perf_json)
    return 0 if all(r.ok for r in records) else 1


def print_perf(records: list[dict[str, Any]], json_path: str | None) -> None:
    from rich.console import Console

    from .perf_report import render, report

    data = report(records)
    render(data, Console(width=None if sys.stdout.isatty() else 200))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
