"""First-use compilation of a launch's kernels under a progress spinner, timed and logged."""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from tilegraph._device import SIMULATOR

log = logging.getLogger("tilegraph")

COMPILE_SECONDS: dict[str, float] = {}


def compile_with_progress(label: str, kernels: Sequence[tuple[Any, str]]) -> float:
    """Compile ``(dispatcher, signature)`` pairs now, under a spinner; record and log the time.
    On the simulator there is nothing to compile (hooks were checked at Variant construction)."""
    if label in COMPILE_SECONDS:
        return COMPILE_SECONDS[label]
    start = time.perf_counter()
    if not SIMULATOR:
        from rich.console import Console

        console = Console(stderr=True)
        with console.status(f"[bold]tilegraph[/]: compiling {label} (first use; ~1 s per kernel)", spinner="dots"):
            for kernel, signature in kernels:
                kernel.compile(signature)
        seconds = time.perf_counter() - start
        if console.is_terminal:
            console.print(f"tilegraph: compiled {label} in {seconds:.2f} s")
    else:
        seconds = 0.0
    COMPILE_SECONDS[label] = seconds
    log.info("compiled %s in %.2f s", label, seconds)
    return seconds
