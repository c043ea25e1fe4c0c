"""What every benchmark suite shares: timing, the two ceilings, length mixes, run metadata, output.

Timing: on a GPU, one pair of CUDA events per repetition after warm-up (medians are quoted); on the
simulator (``--smoke`` only) host ``perf_counter`` around each call. Ceilings: a large
device-to-device copy (bytes read + bytes written) and a large bf16 matmul, measured in the same
process as the numbers quoted against them.

``python -m tilegraph.tools.bench.common --json PATH`` measures the ceilings alone (``gpu-run`` uses it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

EXIT_OK, EXIT_USAGE, EXIT_NEEDS_GPU = 0, 2, 3
MIXES = ("uniform", "skewed", "lognormal")
DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2, when torch does not report it
REPO_ROOT = Path(__file__).resolve().parents[2]


class Skip(Exception):
    """An implementation that cannot run a case (the reason goes into the row)."""


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def choice_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type: comma-separated names out of ``allowed`` (empty: none)."""

    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}: choose from {', '.join(allowed)}")
        return values

    return parse


# ---- where we run -------------------------------------------------------------------------------


def on_gpu() -> bool:
    """True when tilegraph's kernels run on a CUDA GPU in this process."""
    from tilegraph._device import SIMULATOR

    return not SIMULATOR and torch.cuda.is_available()


def needs_gpu_message(what: str) -> str:
    return (
        f"{what} needs a CUDA GPU, and tilegraph runs its kernels on the numba CUDA simulator in this "
        "process (no GPU was found, or TILEGRAPH_SIMULATOR=1 / NUMBA_ENABLE_CUDASIM=1 is set). Run it on "
        "a machine with a GPU"
    )


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 8 * 2**20
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotation_sets(bytes_per_set: int, device: torch.device, max_sets: int = 32, budget_bytes: int = 8 * 2**30) -> int:
    """How many input sets to rotate through so one pass over them is at least 3x the L2."""
    want = math.ceil(3 * l2_bytes(device) / max(bytes_per_set, 1))
    affordable = max(budget_bytes // max(bytes_per_set, 1), 1)
    return int(max(1, min(want, max_sets, affordable)))


# ---- timing -------------------------------------------------------------------------------------


Timing = tuple[list[float], float]  # (microseconds per timed call, host microseconds per call)


def time_calls_us(call: Callable[[int], Any], reps: int, warmup: int, gpu: bool) -> Timing:
    """Microseconds of ``call(i)`` for ``reps`` repetitions after ``warmup`` (``i`` counts on, so
    callers rotate their inputs with it), and the host microseconds per call of the timed loop.
    GPU: CUDA events around each call, read after one sync at the end."""
    for i in range(warmup):
        call(i)
    if not gpu:
        times_us = []
        for i in range(warmup, warmup + reps):
            start_ns = time.perf_counter_ns()
            call(i)
            times_us.append((time.perf_counter_ns() - start_ns) / 1e3)
        return times_us, float(np.mean(times_us))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    loop_start_ns = time.perf_counter_ns()
    for rep in range(reps):
        starts[rep].record()
        call(warmup + rep)
        ends[rep].record()
    host_us_per_call = (time.perf_counter_ns() - loop_start_ns) / 1e3 / reps
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)], host_us_per_call


def stats_us(timing: Timing) -> dict[str, Any]:
    """Median/p10/p90 of the timed calls; ``host_bound`` when the host took at least as long per call
    as the device (the device then waited on Python and the times include launch gaps)."""
    times_us, host_us_per_call = timing
    t = np.asarray(times_us, dtype=np.float64)
    median = float(np.median(t))
    return {"median_us": median, "p10_us": float(np.percentile(t, 10)), "p90_us": float(np.percentile(t, 90)),
            "reps": int(t.size), "host_us_per_call": host_us_per_call,
            "host_bound": bool(host_us_per_call >= 0.9 * median)}  # fmt: skip


# ---- ceilings -----------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, reps: int = 30) -> dict[str, Any]:
    """Device-to-device copy of ``nbytes`` (random data): GB/s counting bytes read + written."""
    gpu = device.type == "cuda"
    src = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=device)
    dst = torch.empty_like(src)
    s = stats_us(time_calls_us(lambda i: dst.copy_(src), reps, warmup=3, gpu=gpu))
    return {"copy_bytes": nbytes, "gbs": 2 * nbytes / (s["median_us"] * 1e3), **s}


def matmul_rate(device: torch.device, n: int = 8192, reps: int = 20) -> dict[str, Any]:
    """bf16 ``n x n @ n x n`` (random inputs): TFLOP/s at 2 n^3 flops."""
    gpu = device.type == "cuda"
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    s = stats_us(time_calls_us(lambda i: torch.matmul(a, b, out=c), reps, warmup=3, gpu=gpu))
    return {"n": n, "tflops": 2 * n**3 / (s["median_us"] * 1e6), **s}


def ceilings(device: torch.device, small: bool = False) -> dict[str, Any]:
    if small:
        return {"copy": copy_bandwidth(device, 2**23, reps=3), "matmul_bf16": matmul_rate(device, 256, reps=2)}
    return {"copy": copy_bandwidth(device), "matmul_bf16": matmul_rate(device)}


# ---- length mixes -------------------------------------------------------------------------------


def length_mix(
    kind: str,
    batch_size: int,
    rng: np.random.Generator,
    uniform_tokens: int = 1024,
    long_tokens: int = 32768,
    short_tokens: int = 512,
    median_tokens: int = 700,
) -> list[int]:
    """KV lengths of a batch: ``uniform`` (all ``uniform_tokens``), ``skewed`` (one ``long_tokens``
    request among ``short_tokens`` ones), ``lognormal`` (ShareGPT-like: median ``median_tokens``,
    sigma 1, clipped to [16, long_tokens])."""
    if kind == "uniform":
        return [uniform_tokens] * batch_size
    if kind == "skewed":
        return [long_tokens] + [short_tokens] * (batch_size - 1)
    if kind == "lognormal":
        draws = rng.lognormal(mean=math.log(median_tokens), sigma=1.0, size=batch_size)
        return np.clip(np.rint(draws), min(16, long_tokens), long_tokens).astype(int).tolist()
    raise ValueError(f"unknown length mix {kind!r}: one of {MIXES}")


def page_table(lengths: Sequence[int], page_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kv_indptr, kv_indices, kv_last_page_len) int32 for ``lengths``, pages shuffled over a pool of
    exactly the pages needed."""
    pages = [-(-n // page_size) for n in lengths]
    kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    kv_indices = rng.permutation(int(kv_indptr[-1])).astype(np.int32)
    kv_last_page_len = np.array([(n - 1) % page_size + 1 if n else 0 for n in lengths], dtype=np.int32)
    return kv_indptr, kv_indices, kv_last_page_len


# ---- metadata and output ------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def code_version() -> str:
    """Short git revision of the checkout (``+dirty`` when tracked files changed), else the package
    version. Looks in the package's repository, then in the working directory (a wheel install)."""
    for where in (REPO_ROOT, Path.cwd()):
        try:
            rev = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
            dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
            return rev + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            continue
    import tilegraph

    return f"tilegraph {tilegraph.__version__} (no git)"


def device_description(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"name": "numba CUDA simulator (CPU)", "type": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "type": "cuda", "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count, "memory_bytes": props.total_memory,
            "l2_bytes": l2_bytes(device)}  # fmt: skip


def versions() -> dict[str, str | None]:
    names = ("torch", "numba", "numba-cuda", "nvtx", "triton", "flashinfer-python", "cuda-python", "numpy")
    return {"python": platform.python_version(), **{n: _version(n) for n in names},
            "torch_cuda": torch.version.cuda}  # fmt: skip


def run_meta(device: torch.device, smoke: bool) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "device": device_description(device),
        "versions": versions(),
        "clock": "cuda-event" if device.type == "cuda" else "host",
        "smoke": smoke,
        "argv": sys.argv,
    }


def write_json(path: Path, payload: Any) -> Path:
    """Write ``payload`` as JSON (NaN/inf as null), atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Reporter:
    """A suite's live output: a rich table of finished rows above a progress bar, and the suite's
    JSON rewritten after every row (a time-boxed run keeps what it finished).

    ``columns``: (row key, header, format spec) in display order."""

    def __init__(self, suite: str, json_path: Path, columns: Sequence[tuple[str, str, str]], total: int, meta: dict[str, Any]):
        from rich.console import Console

        self.suite, self.json_path, self.columns, self.total = suite, json_path, list(columns), total
        self.payload: dict[str, Any] = {"suite": suite, "meta": meta, "ceilings": {}, "rows": [], "notes": []}
        self.console = Console()
        self._live: Any = None
        self._progress: Any = None
        self._task: Any = None
        self._table = self._new_table()

    def _new_table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"tilegraph bench {self.suite}")
        for _, header, _ in self.columns:
            table.add_column(header, justify="right")
        return table

    def __enter__(self) -> "Reporter":
        from rich.console import Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self.console)  # fmt: skip
        self._task = self._progress.add_task(self.suite, total=self.total)
        self._live = Live(Group(self._table, self._progress), console=self.console, refresh_per_second=4)
        self._live.__enter__()
        self.save()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.__exit__(*exc)
        self.save()

    def step(self, description: str) -> None:
        """Say what runs now (the progress bar's text)."""
        self._progress.update(self._task, description=description)

    def add(self, row: dict[str, Any], advance: bool = True) -> None:
        self.payload["rows"].append(row)
        self._table.add_row(*(_cell(row.get(key), fmt) for key, _, fmt in self.columns))
        if advance:
            self._progress.advance(self._task)
        if not self.console.is_terminal:
            self.console.print(" ".join(f"{h}={_cell(row.get(k), f)}" for k, h, f in self.columns))
        self.save()

    def advance(self) -> None:
        self._progress.advance(self._task)

    def note(self, text: str) -> None:
        self.payload["notes"].append(text)
        self.console.print(f"[yellow]note:[/] {text}")
        self.save()

    def save(self) -> Path:
        return write_json(self.json_path, self.payload)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and fmt:
        return format(value, fmt)
    return str(value)


def plot_lines(
    rows: Sequence[dict[str, Any]],
    path: Path,
    x: str,
    y: str,
    line: str,
    panel: str | None = None,
    ceiling: tuple[str, float] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> Path | None:
    """One panel per value of ``panel`` (or one panel), one line per value of ``line``: ``y`` over
    ``x`` (log2 x axis), and a dashed horizontal ``ceiling`` (label, value). Rows missing ``y`` are
    left out. Returns the PNG path, or None when there is nothing to draw (or no matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print(f"no plot ({path.name}): matplotlib is not installed (pip install 'tilegraph[bench]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.get(y), (int, float)) and isinstance(r.get(x), (int, float))]
    if not rows:
        return None
    panels = list(dict.fromkeys(r[panel] for r in rows)) if panel else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, value in zip(axes[0], panels):
        mine = [r for r in rows if panel is None or r[panel] == value]
        for name in dict.fromkeys(r[line] for r in mine):
            pts = sorted((r[x], r[y]) for r in mine if r[line] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(name))
        if ceiling is not None:
            ax.axhline(ceiling[1], linestyle="--", color="gray", label=ceiling[0])
        ax.set_xscale("log", base=2)
        ax.set_title(f"{panel}={value}" if panel else title)
        ax.set_xlabel(xlabel or x)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(ylabel or y)
    axes[0][-1].legend(fontsize="small")
    if panel:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tilegraph.tools.bench.common", description="measure the two ceilings")
    parser.add_argument("--json", type=Path, required=True, help="where to write the ceilings")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (checks the code path, measures nothing)")
    args = parser.parse_args(argv)
    if not on_gpu() and not args.smoke:
        print(needs_gpu_message("measuring the ceilings"), file=sys.stderr)
        return EXIT_NEEDS_GPU
    device = torch.device("cuda") if on_gpu() else torch.device("cpu")
    result = {"meta": run_meta(device, args.smoke), "ceilings": ceilings(device, small=args.smoke)}
    write_json(args.json, result)
    c = result["ceilings"]
    print(f"copy {c['copy']['gbs']:.0f} GB/s (read+write), bf16 matmul {c['matmul_bf16']['tflops']:.0f} TFLOP/s")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
