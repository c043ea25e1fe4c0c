"""NVTX ranges in the ``tilegraph`` domain, and the one hook point profiling sessions listen on.

Every instrumented site holds a hoisted ``Range`` and runs ``with RANGE: ...``. A range has a phase
(its NVTX category: plan, upload, capture, replay, launch) and a name (the NVTX message: the phase,
or the kernel's name for a launch). Its event attributes are built once, when the range is made.

    with nvtx_ranges.PLAN: ...                      # fixed ranges: PLAN, UPLOAD, CAPTURE, REPLAY
    with nvtx_ranges.launch_range("decode"): ...    # one cached range per kernel name

Listeners (``tilegraph.profile()`` sessions) get ``range_begin``/``range_end`` for every range and
``plan_made`` for every plan made inside ``plan_range``-wrapped methods.

Cost with no profiler attached: nvtx then hands out a dummy domain and nothing listens, so a range
is a ``with`` on a slotted object whose ``__enter__``/``__exit__`` test one module global and return.
Measured on the 2-core development machine (``python -m tilegraph.nvtx_ranges``: min of 7 runs of
200k enter/exit pairs; CPython 3.11, nvtx 0.2.17), in ns per range (enter + exit):

    bare ``with`` on a no-op slotted object (the floor)       ~120
    tilegraph Range, no tool attached                          ~125
    tilegraph Range, NVTX_DISABLE=1                            ~125
    (dummy domain push_range + pop_range, for comparison       ~37)
    (a new ``nvtx.annotate(...)`` object per call              ~460)
    tilegraph Range inside an open ``tilegraph.profile()``    ~2100  (host timers)

With a tool attached, push/pop go to the real ``tilegraph`` domain; with ``NVTX_DISABLE=1`` they
never do, whatever is attached. docs/profiling.md has the same numbers.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Protocol, TypeVar

DOMAIN_NAME = "tilegraph"
PHASES = ("plan", "upload", "capture", "replay", "launch")
PHASE_COLORS = {"plan": 0x4C72B0, "upload": 0x55A868, "capture": 0xC44E52, "replay": 0x8172B2, "launch": 0xCCB974}


class Listener(Protocol):
    def range_begin(self, phase: str, name: str) -> None: ...
    def range_end(self, phase: str, name: str) -> None: ...
    def plan_made(self, plan: Any) -> None: ...


class _NoDomain:
    """Stands in for an NVTX domain when nvtx is missing or NVTX_DISABLE is set."""

    def get_event_attributes(self, message: Any = None, color: Any = None, category: Any = None) -> None:
        return None

    def push_range(self, attributes: Any = None) -> None:
        return None

    def pop_range(self) -> None:
        return None


def _real_nvtx() -> Any:
    if os.environ.get("NVTX_DISABLE"):
        return None
    try:
        import nvtx
    except ImportError:
        return None
    return nvtx


def _domain_from(api: Any) -> tuple[Any, bool]:
    """(domain, whether pushing to it can reach a tool: nvtx hands out a DummyDomain when none is
    attached; an injected recorder's domain always counts as live)."""
    if api is None:
        return _NoDomain(), False
    domain = api.get_domain(DOMAIN_NAME)
    return domain, type(domain).__name__ != "DummyDomain"


_api: Any = _real_nvtx()
_domain, _nvtx_live = _domain_from(_api)
_listeners: tuple[Listener, ...] = ()
_hooked = _nvtx_live  # True when a range must do anything at all
_ranges: dict[tuple[str, str], "Range"] = {}


class Range:
    """A reusable NVTX range (phase = category, name = message); enter/exit it with ``with``."""

    __slots__ = ("phase", "name", "attributes")

    def __init__(self, phase: str, name: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}: one of {PHASES}")
        self.phase, self.name = phase, name
        self.attributes = _attributes_for(phase, name)

    def __enter__(self) -> "Range":
        if _hooked:
            _begin(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if _hooked:
            _end(self)

    def __repr__(self) -> str:
        return f"Range({self.phase!r}, {self.name!r})"


def _attributes_for(phase: str, name: str) -> Any:
    return _domain.get_event_attributes(message=name, color=PHASE_COLORS[phase], category=phase)


def _begin(rng: Range) -> None:
    if _nvtx_live:
        _domain.push_range(rng.attributes)
    for listener in _listeners:
        listener.range_begin(rng.phase, rng.name)


def _end(rng: Range) -> None:
    for listener in reversed(_listeners):
        listener.range_end(rng.phase, rng.name)
    if _nvtx_live:
        _domain.pop_range()


def get_range(phase: str, name: str | None = None) -> Range:
    """The cached range for (phase, name); ``name`` defaults to the phase."""
    key = (phase, name or phase)
    rng = _ranges.get(key)
    if rng is None:
        rng = _ranges[key] = Range(*key)
    return rng


def launch_range(kernel_name: str) -> Range:
    """The range a launch of ``kernel_name`` runs in (category ``launch``, message the kernel name)."""
    rng = _ranges.get(("launch", kernel_name))
    return rng if rng is not None else get_range("launch", kernel_name)


PLAN = get_range("plan")
UPLOAD = get_range("upload")
CAPTURE = get_range("capture")
REPLAY = get_range("replay")


def note_plan(plan: Any) -> None:
    """Tell listeners about a plan just made (no-op when nothing listens)."""
    for listener in _listeners:
        listener.plan_made(plan)


F = TypeVar("F", bound=Callable[..., Any])


def plan_range(method: F) -> F:
    """Run ``method`` in the PLAN range and hand its return value (a plan) to listeners."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with PLAN:
            plan = method(*args, **kwargs)
            if _listeners:
                note_plan(plan)
        return plan

    return wrapper  # type: ignore[return-value]


def _refresh_hooked() -> None:
    global _hooked
    _hooked = _nvtx_live or bool(_listeners)


def add_listener(listener: Listener) -> None:
    global _listeners
    _listeners = (*_listeners, listener)
    _refresh_hooked()


def remove_listener(listener: Listener) -> None:
    global _listeners
    _listeners = tuple(x for x in _listeners if x is not listener)
    _refresh_hooked()


def use_nvtx(api: Any) -> Any:
    """Send ranges to ``api`` (an object with nvtx's ``get_domain``; None: the real nvtx, honouring
    NVTX_DISABLE). Rebuilds every cached range's attributes. Returns the api used before."""
    global _api, _domain, _nvtx_live
    previous = _api
    _api = api if api is not None else _real_nvtx()
    _domain, _nvtx_live = _domain_from(_api)
    for rng in _ranges.values():
        rng.attributes = _attributes_for(rng.phase, rng.name)
    _refresh_hooked()
    return previous


def nvtx_live() -> bool:
    """Whether ranges reach an NVTX domain that a tool (or an injected recorder) can see."""
    return _nvtx_live


def measure_overhead_ns(pairs: int = 200_000, repeats: int = 7) -> dict[str, float]:
    """Nanoseconds per enter+exit pair (min over ``repeats``) of: a bare ``with`` on a no-op object,
    a tilegraph Range as configured now, the dummy-domain push/pop, and a new annotate per call."""
    import time

    class _Nothing:
        __slots__ = ()

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            return None

    def per_pair(body: Callable[[], None]) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter_ns()
            body()
            best = min(best, (time.perf_counter_ns() - start) / pairs)
        return best

    nothing, rng, loop = _Nothing(), get_range("plan", "overhead probe"), range(pairs)

    def bare() -> None:
        for _ in loop:
            with nothing:
                pass

    def ranged() -> None:
        for _ in loop:
            with rng:
                pass

    result = {"bare_with_ns": per_pair(bare), "tilegraph_range_ns": per_pair(ranged)}
    if _api is not None:
        domain, attributes = _domain, rng.attributes

        def push_pop() -> None:
            for _ in loop:
                domain.push_range(attributes)
                domain.pop_range()

        def new_annotate() -> None:
            for _ in loop:
                with _api.annotate("probe", domain=DOMAIN_NAME, category="plan"):
                    pass

        result["domain_push_pop_ns"] = per_pair(push_pop)
        result["new_annotate_per_call_ns"] = per_pair(new_annotate)
    return result


if __name__ == "__main__":
    print({"NVTX_DISABLE": os.environ.get("NVTX_DISABLE"), "nvtx_live": _nvtx_live, **measure_overhead_ns()})
