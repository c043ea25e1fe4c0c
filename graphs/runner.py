"""``tilegraph.GraphRunner``: capture a forward once per batch-size bucket, then plan + replay.

    runner = tilegraph.GraphRunner(forward, example_inputs, attention=dec)
    runner.capture_all()                       # largest bucket first, one shared memory pool
    out = runner.run(inputs, kv_indptr, kv_indices, kv_last_page_len)   # pad, plan, copy, replay

``forward(inputs: dict[str, Tensor]) -> Tensor`` is any model step whose tensors' first dimension
is the batch (query tokens for prefill: pass token-count ``buckets`` and use ``step()``) and whose tilegraph attention objects (``attention``) read the current plan. Per
step the runner pads the batch to the next bucket (padded requests get no pages and no tiles:
they write nothing and nothing of theirs reaches real rows), plans, copies the inputs into the
bucket's static buffers, uploads the plan on the replay stream and replays. Batches above the
largest bucket run eagerly (counted in ``stats.eager_steps``).

The returned tensor is a view of the bucket's static output: **the next replay overwrites it**.
Pass ``copy=True`` (or clone it) to keep it.

On the simulator the graph is ``SimulatedGraph`` (same discipline, see graphs/standin.py).
"""

from __future__ import annotations

import bisect
import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from rich.progress import Progress

from tilegraph import nvtx_ranges
from tilegraph.errors import InputError, PageTableMovedError, StateError
from tilegraph.settings import Settings

from .protocol import GraphAware
from .standin import SimulatedGraph

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class RunnerStats:
    replays: int = 0
    eager_steps: int = 0
    capture_s: dict[int, float] = field(default_factory=dict)  # bucket -> seconds to warm up + capture


@dataclass
class _Bucket:
    batch_size: int
    graph: Any
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor
    addresses: dict[str, int]
    keys: list[str]  # each attention object's Settings/variant key at capture
    page_tables: list[int]  # each attention object's device page-table address at capture (0: none)


class GraphRunner:
    """Owns static inputs/outputs per bucket and one captured graph per bucket."""

    def __init__(
        self,
        forward: Forward,
        example_inputs: dict[str, torch.Tensor],
        attention: GraphAware | Sequence[GraphAware],
        settings: Settings | None = None,
        debug: bool = False,
        buckets: Sequence[int] | None = None,
    ) -> None:
        if not callable(forward):
            raise InputError(f"forward must be callable (inputs dict -> Tensor), got {type(forward).__name__}")
        _check_example_inputs(example_inputs)
        self.forward = forward
        self.attention: list[GraphAware] = _check_attention(attention)
        if settings is not None and not isinstance(settings, Settings):
            raise InputError(f"settings must be a tilegraph.Settings or None, got {type(settings).__name__}")
        self.settings = settings or getattr(self.attention[0], "settings", None)
        if not isinstance(self.settings, Settings):
            raise InputError("settings: pass Settings (attention[0] has no .settings to take them from)")
        self.buckets = _check_buckets(buckets, self.attention, self.settings)
        self.debug = bool(debug)
        self.device = next(iter(example_inputs.values())).device
        self.simulated = self.device.type != "cuda"
        largest = self.buckets[-1]
        self.static_inputs = {
            name: torch.zeros((largest, *t.shape[1:]), dtype=t.dtype, device=self.device)
            for name, t in example_inputs.items()
        }
        self.stats = RunnerStats()
        self._graphs: dict[int, _Bucket] = {}
        self._pool: Any = None
        self._stream = None if self.simulated else torch.cuda.Stream(self.device)
        # per attention object: the serial of its plan the last replay ran (each needs a newer one)
        self._last_replayed_serials = [0] * len(self.attention)

    # ---- capture -------------------------------------------------------------------------------

    def _new_graph(self) -> Any:
        return SimulatedGraph() if self.simulated else torch.cuda.CUDAGraph()

    @contextmanager
    def capture(self, batch_size: int) -> Iterator[Any]:
        """Capture whatever runs inside into the graph yielded (on the capture stream, shared pool,
        Python GC frozen, attention objects in capture mode)."""
        graph = self._new_graph()
        for att in self.attention:
            att.graph_set_capturing(True)
        gc.collect()
        gc.disable()
        try:
            if self.simulated:
                with graph.capture():
                    yield graph
            else:
                with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                    yield graph
                self._pool = graph.pool()
        finally:
            gc.enable()
            for att in self.attention:
                att.graph_set_capturing(False)

    def _warm_up(self, inputs: dict[str, torch.Tensor]) -> None:
        if self.simulated:
            self.forward(inputs)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for _ in range(2):
                self.forward(inputs)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def capture_all(self, show_progress: bool = True) -> None:
        """Warm up and capture every bucket, largest first (so smaller ones reuse its pool)."""
        with Progress(disable=not show_progress, transient=False) as progress:
            task = progress.add_task("capturing CUDA graphs", total=len(self.buckets))
            for batch_size in reversed(self.buckets):
                start = time.perf_counter()
                inputs = {name: t[:batch_size] for name, t in self.static_inputs.items()}
                for att in self.attention:
                    att.graph_prepare_capture(batch_size)
                self._warm_up(inputs)  # compiles every specialization outside the capture
                for att in self.attention:
                    att.graph_prepare_capture(batch_size)
                    att.graph_before_replay()
                with nvtx_ranges.CAPTURE, self.capture(batch_size) as graph:
                    output = self.forward(inputs)
                states = [att.graph_plan_state() for att in self.attention]
                keys, tables = [st.key for st in states], [st.page_table_address for st in states]
                self._graphs[batch_size] = _Bucket(batch_size, graph, inputs, output, self._addresses(inputs, output), keys, tables)
                seconds = time.perf_counter() - start
                self.stats.capture_s[batch_size] = seconds
                progress.update(task, advance=1, description=f"captured batch {batch_size} in {seconds:.2f} s")
        if not self.simulated:
            torch.cuda.synchronize(self.device)

    def _addresses(self, inputs: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, int]:
        addresses = {f"input:{n}": t.data_ptr() for n, t in inputs.items()}
        addresses["output"] = output.data_ptr()
        for i, att in enumerate(self.attention):
            addresses.update({f"attention{i}:{n}": t.data_ptr() for n, t in att.graph_buffers().items()})
        return addresses

    # ---- steps ---------------------------------------------------------------------------------

    def bucket_for(self, batch_size: int) -> int | None:
        """The smallest captured bucket >= batch_size (None: above the largest; runs eagerly)."""
        index = bisect.bisect_left(self.buckets, batch_size)
        return self.buckets[index] if index < len(self.buckets) else None

    def run(
        self,
        inputs: dict[str, torch.Tensor],
        kv_indptr: Any,
        kv_indices: Any,
        kv_last_page_len: Any,
        copy: bool = False,
    ) -> torch.Tensor:
        """One decode step: plan every attention object for the bucket, then replay (or run eagerly)."""

        def plan(padded: int | None) -> None:
            for att in self.attention:
                att.plan(kv_indptr, kv_indices, kv_last_page_len, padded_batch_size=padded)

        return self.step(inputs, plan, copy=copy)

    def step(self, inputs: dict[str, torch.Tensor], plan: Callable[[int | None], Any], copy: bool = False) -> torch.Tensor:
        """One step of any graph-aware attention: ``plan(bucket)`` plans every attention object for
        ``bucket`` rows (``None``: no padding, the step runs eagerly). For prefill the rows are query
        tokens and the buckets token counts: e.g. ``plan = lambda n: prefill.plan(qo_indptr, kv_indptr,
        kv_indices, kv_last_page_len, padded_num_tokens=n)``."""
        if not callable(plan):
            raise InputError(f"plan must be callable (bucket rows or None -> plans every attention object), got {type(plan).__name__}")
        batch_size = _batch_of(inputs, self.static_inputs)
        bucket = self.bucket_for(batch_size)
        if bucket is None:
            plan(None)
            self.stats.eager_steps += 1
            return self.forward(inputs)
        entry = self._graphs.get(bucket)
        if entry is None:
            raise StateError(f"no graph captured for bucket {bucket}: call capture_all() first")
        plan(bucket)
        for name, t in inputs.items():
            entry.inputs[name][:batch_size].copy_(t)
        self.replay(bucket)
        out = entry.output[:batch_size]
        return out.clone() if copy else out

    def replay(self, batch_size: int) -> None:
        """Replay bucket ``batch_size`` after checking every attention object has a fresh plan for it."""
        entry = self._graphs.get(batch_size)
        if entry is None:
            raise StateError(f"no graph captured for bucket {batch_size}")
        serials = []
        for i, att in enumerate(self.attention):
            state = att.graph_plan_state()
            if state.serial <= self._last_replayed_serials[i]:
                raise StateError(
                    f"replay of bucket {batch_size} without a new plan (attention object {i}'s plan "
                    f"#{state.serial} was already replayed): call plan() before every replay"
                )
            if state.key != entry.keys[i]:
                raise StateError(
                    f"attention object {i}'s plan was made under other Settings or another variant than "
                    f"the graph for bucket {batch_size} was captured with"
                )
            if state.padded_batch_size != batch_size:
                raise StateError(
                    f"attention object {i}'s plan is for bucket {state.padded_batch_size}, not {batch_size}"
                )
            if state.page_table_address != entry.page_tables[i]:
                raise PageTableMovedError(
                    f"attention object {i}'s plan reads page ids from the tensor at {state.page_table_address:#x}, "
                    f"but the graph for bucket {batch_size} was captured reading {entry.page_tables[i]:#x}: keep one "
                    f"page-table tensor (a fixed address) for every plan of a captured graph"
                )
            serials.append(state.serial)
        if self.debug:
            now = self._addresses(entry.inputs, entry.output)
            moved = [name for name, ptr in entry.addresses.items() if now.get(name) != ptr]
            if moved:
                raise StateError(f"static buffers moved since capture (debug check): {', '.join(moved)}")
        for att in self.attention:
            att.graph_before_replay()
        with nvtx_ranges.REPLAY:
            entry.graph.replay()
        self._last_replayed_serials = serials
        for att in self.attention:
            after = getattr(att, "graph_after_replay", None)
            if after is not None:
                after()  # the debug page-id check (a host sync) when the object's Settings ask for it
        self.stats.replays += 1


def _check_example_inputs(example_inputs: Any) -> None:
    if not isinstance(example_inputs, dict) or not example_inputs:
        got = type(example_inputs).__name__ if not isinstance(example_inputs, dict) else "an empty dict"
        raise InputError(f"example_inputs must be a non-empty dict of name -> Tensor (batch first), got {got}")
    for name, t in example_inputs.items():
        if not isinstance(name, str):
            raise InputError(f"example_inputs keys must be str, got {name!r}")
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            what = f"a {t.dim()}-D tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"example_inputs[{name!r}] must be a tensor whose first dimension is the batch, got {what}")
    devices = {t.device for t in example_inputs.values()}
    if len(devices) != 1:
        raise InputError(f"example_inputs are on several devices {sorted(map(str, devices))}: use one")
    if next(iter(devices)).type == "meta":
        raise InputError("example_inputs are meta tensors: the static buffers need a real device")


def _check_attention(attention: Any) -> list[GraphAware]:
    items = list(attention) if isinstance(attention, (list, tuple)) else [attention]
    if not items:
        raise InputError("attention must be a graph-aware object or a non-empty list of them, got an empty list")
    for i, att in enumerate(items):
        if not isinstance(att, GraphAware):
            raise InputError(
                f"attention[{i}] is a {type(att).__name__}, not a graph-aware object (BatchDecode, BatchPrefill, "
                "CascadeAttention, or anything implementing tilegraph.graphs.protocol.GraphAware)"
            )
    return items


def _max_rows(att: Any) -> tuple[int, str] | None:
    """The most q/out rows ``att`` plans (its bucket bound), and the Settings field that says so."""
    bound = getattr(att, "graph_max_rows", None)  # optional protocol method (graphs/protocol.py)
    return bound() if callable(bound) else None


def _check_buckets(buckets: Any, attention: list[Any], settings: Settings) -> tuple[int, ...]:
    if buckets is None:
        values = tuple(settings.graph_batch_sizes)
    else:
        if isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__iter__"):
            raise InputError(f"buckets must be a sequence of positive integers, got {type(buckets).__name__}")
        values = tuple(buckets)
        if not values:
            raise InputError("buckets must hold at least one bucket, got an empty sequence")
        for b in values:
            if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
                raise InputError(f"buckets must be positive integers, got {b!r} in {list(values)}")
        values = tuple(sorted({int(b) for b in values}))
    for i, att in enumerate(attention):
        bound = _max_rows(att)
        if bound is not None and values[-1] > bound[0]:
            raise InputError(f"buckets: {values[-1]} exceeds attention[{i}]'s Settings.{bound[1]}={bound[0]}")
    return values


def _batch_of(inputs: dict[str, torch.Tensor], static_inputs: dict[str, torch.Tensor]) -> int:
    if not isinstance(inputs, dict):
        raise InputError(f"inputs must be a dict of name -> Tensor, got {type(inputs).__name__}")
    if set(inputs) != set(static_inputs):
        raise InputError(f"inputs has keys {sorted(map(repr, inputs))}, the runner was built for {sorted(static_inputs)}")
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            what = "a 0-D tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"inputs[{name!r}] must be a torch.Tensor whose first dimension is the batch, got {what}")
    sizes = {t.shape[0] for t in inputs.values()}
    if len(sizes) != 1:
        raise InputError(f"inputs disagree on the batch size (first dimension): {sorted(sizes)}")
    batch_size = sizes.pop()
    for name, t in inputs.items():
        ref = static_inputs[name]
        if t.device != ref.device:
            raise InputError(f"inputs[{name!r}] is on {t.device}, the runner's static buffers are on {ref.device}")
        if t.shape[1:] != ref.shape[1:] or t.dtype != ref.dtype:
            raise InputError(f"inputs[{name!r}] is {tuple(t.shape)} {t.dtype}; expected [B, {', '.join(map(str, ref.shape[1:]))}] {ref.dtype}")
    return int(np.int64(batch_size))
