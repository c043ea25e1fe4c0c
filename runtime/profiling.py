"""``tilegraph.profile()``: time the phases (plan, upload, capture, replay, kernel launches) run inside.

    with tilegraph.profile() as prof:
        for step in steps:
            dec.plan(...); dec.run(...)
    prof.summary()          # rows: phase, name, count, median_us, p90_us, total_us, clock
    console.print(prof.table())
    prof.to_json("profile.json")

The session listens on the same hooks as the NVTX ranges (``tilegraph.nvtx_ranges``). Every range
gets a host ``perf_counter`` time. On a GPU, device phases (upload, replay, launch) also get a pair
of CUDA events recorded on the current stream; they are read only when the session exits, so
nothing inside waits for the device. Inside a CUDA graph capture (a ``capture`` range is open, or
torch says the current stream is capturing) no event is recorded: only host times are kept, and
the rows say so (``in_capture``). Host phases (plan, capture) are always host-timed.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import nvtx_ranges
from .errors import StateError

DEVICE_PHASES = frozenset({"upload", "replay", "launch"})
_EVENT_CHUNK = 64


@dataclass
class PhaseSample:
    """One finished range: host time always, device time when CUDA events timed it."""

    phase: str
    name: str
    host_us: float
    device_us: float | None = None
    in_capture: bool = False

    @property
    def time_us(self) -> float:
        return self.device_us if self.device_us is not None else self.host_us


@dataclass
class PlanStats:
    batch_size: int
    num_tiles: int
    num_ctas: int
    balance: float
    makespan: float

    @classmethod
    def of(cls, plan: Any) -> "PlanStats":
        return cls(
            batch_size=int(getattr(plan, "batch_size", 0)),
            num_tiles=int(getattr(plan, "num_tiles", 0)),
            num_ctas=int(getattr(plan, "num_ctas", 0)),
            balance=float(getattr(plan, "balance", float("nan"))),
            makespan=float(getattr(plan, "makespan", float("nan"))),
        )


@dataclass
class _Open:
    phase: str
    name: str
    start_ns: int
    start_event: Any
    in_capture: bool


@dataclass
class _Timed:
    """A range whose CUDA events are read at the session's end."""

    sample: PhaseSample
    start_event: Any
    end_event: Any


class ProfileSession:
    """Collects phase timings while entered; summarizes them after it exits."""

    def __init__(self, use_cuda_events: bool | None = None) -> None:
        self.use_cuda_events = _gpu_default() if use_cuda_events is None else use_cuda_events
        self.samples: list[PhaseSample] = []
        self.plans: list[PlanStats] = []
        self.wall_s = 0.0
        self._timed: list[_Timed] = []
        self._stacks: dict[int, list[_Open]] = {}
        self._capture_depth = 0
        self._events: list[Any] = []
        self._state = "new"  # new -> open -> closed
        self._start_s = 0.0
        self._lock = threading.Lock()
        self.event_error: str | None = None

    # ---- session -------------------------------------------------------------------------------

    def __enter__(self) -> "ProfileSession":
        if self._state != "new":
            raise StateError("a profile session can be entered once")
        self._state = "open"
        if self.use_cuda_events:
            self._events = _new_events()  # made up front: none is created inside a timed phase
        self._start_s = time.perf_counter()
        nvtx_ranges.add_listener(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        nvtx_ranges.remove_listener(self)
        self.wall_s = time.perf_counter() - self._start_s
        self._read_events()
        self._state = "closed"

    def _read_events(self) -> None:
        try:
            for timed in self._timed:
                timed.end_event.synchronize()
                timed.sample.device_us = timed.start_event.elapsed_time(timed.end_event) * 1e3
        except RuntimeError as err:  # a failed launch inside the session: keep the host times
            self.event_error = str(err)
        self._timed.clear()
        self._events.clear()

    # ---- listener (called from nvtx_ranges) ---------------------------------------------------

    def range_begin(self, phase: str, name: str) -> None:
        start_ns = time.perf_counter_ns()
        in_capture = self._capture_depth > 0 or (self.use_cuda_events and _stream_capturing())
        if phase == "capture":
            self._capture_depth += 1
        start_event = None
        if self.use_cuda_events and phase in DEVICE_PHASES and not in_capture:
            start_event = self._event()
            start_event.record()
        self._stack().append(_Open(phase, name, start_ns, start_event, in_capture))

    def range_end(self, phase: str, name: str) -> None:
        end_ns = time.perf_counter_ns()
        stack = self._stack()
        if not stack or stack[-1].phase != phase or stack[-1].name != name:
            return  # began before the session was entered
        opened = stack.pop()
        if phase == "capture":
            self._capture_depth -= 1
        sample = PhaseSample(phase, name, (end_ns - opened.start_ns) / 1e3, None, opened.in_capture)
        if opened.start_event is not None:
            end_event = self._event()
            end_event.record()
            self._timed.append(_Timed(sample, opened.start_event, end_event))
        with self._lock:
            self.samples.append(sample)

    def plan_made(self, plan: Any) -> None:
        with self._lock:
            self.plans.append(PlanStats.of(plan))

    def _stack(self) -> list[_Open]:
        return self._stacks.setdefault(threading.get_ident(), [])

    def _event(self) -> Any:
        if not self._events:
            self._events = _new_events()
        return self._events.pop()

    # ---- feeding timings directly ---------------------------------------------------------------

    def record(self, phase: str, name: str, host_us: float, device_us: float | None = None, in_capture: bool = False) -> None:
        """Add one timing (for timings taken elsewhere, or synthetic ones)."""
        with self._lock:
            self.samples.append(PhaseSample(phase, name, float(host_us), device_us, in_capture))

    def record_plan(self, plan: Any) -> None:
        self.plan_made(plan)

    # ---- results --------------------------------------------------------------------------------

    def _require_closed(self) -> None:
        if self._state == "open":
            raise StateError("the profile session is still open: read its results after the `with` block")

    def summary(self) -> list[dict[str, Any]]:
        """One row per (phase, name): count, median_us, p90_us, total_us of the device time where
        CUDA events timed it, else the host time (``clock`` says which), and host_median_us."""
        self._require_closed()
        return summarize(self.samples)

    def plan_summary(self) -> dict[str, Any]:
        """Balance statistics of the plans made inside the session."""
        self._require_closed()
        return summarize_plans(self.plans)

    def to_dict(self) -> dict[str, Any]:
        self._require_closed()
        return {
            "wall_s": self.wall_s,
            "clock": "cuda-event" if self.use_cuda_events else "host",
            "phases": self.summary(),
            "plans": self.plan_summary(),
            "samples": [asdict(s) for s in self.samples],
            "event_error": self.event_error,
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False))
        return path

    def table(self) -> Any:
        """The summary as a ``rich.table.Table`` (plan balance in the caption)."""
        from rich.table import Table

        rows = self.summary()
        plans = self.plan_summary()
        table = Table(title=f"tilegraph profile ({self.wall_s * 1e3:.1f} ms wall)")
        for col in ("phase", "name", "count", "median µs", "p90 µs", "total µs", "clock"):
            table.add_column(col, justify="left" if col in ("phase", "name", "clock") else "right")
        for r in rows:
            table.add_row(r["phase"], r["name"], str(r["count"]), f"{r['median_us']:.1f}", f"{r['p90_us']:.1f}",
                          f"{r['total_us']:.1f}", r["clock"])  # fmt: skip
        if plans["count"]:
            table.caption = (
                f"{plans['count']} plans: balance median {plans['balance_median']:.3f} "
                f"(min {plans['balance_min']:.3f}, max {plans['balance_max']:.3f}), "
                f"tiles median {plans['num_tiles_median']:.0f}"
            )
        return table


def summarize(samples: list[PhaseSample]) -> list[dict[str, Any]]:
    """Rows per (phase, name), in phase order then name."""
    groups: dict[tuple[str, str], list[PhaseSample]] = {}
    for s in samples:
        groups.setdefault((s.phase, s.name), []).append(s)
    order = {p: i for i, p in enumerate(nvtx_ranges.PHASES)}
    rows = []
    for (phase, name), group in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        times_us = np.array([s.time_us for s in group])
        host_us = np.array([s.host_us for s in group])
        on_device = [s.device_us is not None for s in group]
        clock = "cuda-event" if all(on_device) else "host" if not any(on_device) else "mixed"
        rows.append({
            "phase": phase,
            "name": name,
            "count": len(group),
            "median_us": float(np.median(times_us)),
            "p90_us": float(np.percentile(times_us, 90)),
            "total_us": float(times_us.sum()),
            "host_median_us": float(np.median(host_us)),
            "clock": clock,
            "in_capture": sum(s.in_capture for s in group),
        })  # fmt: skip
    return rows


def summarize_plans(plans: list[PlanStats]) -> dict[str, Any]:
    if not plans:
        return {"count": 0}
    balance = np.array([p.balance for p in plans])
    return {
        "count": len(plans),
        "balance_median": float(np.median(balance)),
        "balance_min": float(balance.min()),
        "balance_max": float(balance.max()),
        "num_tiles_median": float(np.median([p.num_tiles for p in plans])),
        "makespan_median": float(np.median([p.makespan for p in plans])),
        "batch_size_median": float(np.median([p.batch_size for p in plans])),
    }


def profile(use_cuda_events: bool | None = None) -> ProfileSession:
    """A profiling session: ``with tilegraph.profile() as prof: ...``, then ``prof.summary()``.

    ``use_cuda_events`` (default: on when kernels run on a GPU) times device phases with CUDA events."""
    if use_cuda_events is not None and not isinstance(use_cuda_events, bool):
        from .errors import InputError

        raise InputError(f"use_cuda_events must be a bool or None, got {use_cuda_events!r}")
    return ProfileSession(use_cuda_events)


def _gpu_default() -> bool:
    from ._device import SIMULATOR

    if SIMULATOR:
        return False
    import torch

    return torch.cuda.is_available()


def _stream_capturing() -> bool:
    import torch

    return bool(torch.cuda.is_current_stream_capturing())


def _new_events() -> list[Any]:
    import torch

    return [torch.cuda.Event(enable_timing=True) for _ in range(_EVENT_CHUNK)]


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
