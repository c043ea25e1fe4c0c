"""Continuous batching over a paged KV cache: requests join and finish at any step, every step is
one plan plus one forward (eager) or one graph replay.

    settings = config.attention_settings(page_size=16, max_batch_size=64, max_num_pages=4096)
    runner = ChunkedRunner(LlamaDecoder(config, device), settings, mode="graphs")  # captures here
    result = serve(runner, [Request(0, prompt=(1, 2, 3), max_new_tokens=8), ...])
    result.tokens[0]        # the greedy tokens of request 0
    result.ttft_s(0), result.itl_s(0)   # its time to first token and mean inter-token latency

Two runners: ``ChunkedRunner`` (tilegraph.serving.chunked) sends prompts through ``BatchPrefill`` in
chunks alongside the running decodes, up to ``max_step_tokens`` token rows per step (decoding
requests first, one row each, then prompt chunks first come first served), the way serving
engines schedule chunked prefill; ``DecodeRunner`` feeds a prompt one token per step through the
decode step, like the generated tokens. Either way a request's logits are those of its last row of
the step, and only a step that reaches the end of its prompt samples a token. Sampling is greedy.

Modes of ``DecodeRunner``:
  * ``eager``: plan B requests, run the forward on B rows.
  * ``graphs``: ``GraphRunner`` pads to the next captured bucket, plans, copies the inputs and
    replays (above the largest bucket it runs eagerly).
  * ``eager_padded``: eager, but on the rows of the bucket the graph would use. Matmuls pick their
    algorithm by shape, so eager at B rows and a replay at the bucket's rows may differ in the last
    bits (and then, rarely, in a greedy token); eager_padded is the bit-exact eager twin of a replay.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import torch

from tilegraph.decode import BatchDecode
from tilegraph.errors import InputError, PlanError
from tilegraph.graphs.runner import GraphRunner
from tilegraph.serving.llama import LlamaDecoder, PagedAttention, allocate_kv_cache, check_settings
from tilegraph.page_pool import AppendIndices, PagePool, PageTable, PoolExhaustedError
from tilegraph.serving.reference import decode_reference, relative_error
from tilegraph.settings import Settings

if TYPE_CHECKING:
    from .chunked import ChunkedRunner

Mode = Literal["eager", "eager_padded", "graphs"]
MODES: tuple[Mode, ...] = ("eager", "eager_padded", "graphs")


class StepBuffers:
    """The int32 arrays one step reads on the device, at fixed addresses: token ids, positions,
    append rows (batch index; -1 past the batch), each request's last row, and the page table.
    ``rows``: token rows per step (default max_batch_size: one per request).

    ``load()`` fills a host staging buffer (two alternate; pinned on a GPU, an event keeps each
    from being rewritten while its copy is in flight) and issues ONE async host-to-device copy on
    the current stream -- the stream the following plan upload and replay run on."""

    def __init__(self, settings: Settings, device: torch.device, rows: int | None = None) -> None:
        rows = settings.max_batch_size if rows is None else int(rows)
        sizes = {"token_ids": rows, "positions": rows, "batch_indices": rows, "last_rows": rows,
                 "kv_indptr": settings.max_batch_size + 1, "kv_indices": settings.max_page_refs}  # fmt: skip
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in sizes.items():
            self.offsets[name] = (start, start + size)
            start += size
        on_gpu = device.type == "cuda"
        self.words = torch.zeros(start, dtype=torch.int32, device=device)
        self.views = {name: self.words[a:b] for name, (a, b) in self.offsets.items()}
        self.views["batch_indices"].fill_(-1)  # no rows: a warm-up before any step appends nothing
        self._staging = [torch.zeros(start, dtype=torch.int32, pin_memory=on_gpu) for _ in range(2)]
        self._copy_done = [torch.cuda.Event() if on_gpu else None for _ in range(2)]
        self._next = 0
        self.rows, self.max_batch_size, self.max_page_refs = rows, settings.max_batch_size, settings.max_page_refs

    def inputs(self, rows: int, last_rows: bool = False) -> dict[str, torch.Tensor]:
        """The forward's inputs: views of the first ``rows`` token ids and positions (and, with
        ``last_rows``, of the rows whose logits the step keeps)."""
        names = ("token_ids", "positions", "last_rows") if last_rows else ("token_ids", "positions")
        return {name: self.views[name][:rows] for name in names}

    def load(self, token_ids: np.ndarray, append: AppendIndices, table: PageTable, last_rows: np.ndarray | None = None) -> None:
        """Stage one step's arrays and copy them to the device (ONE async copy). ``last_rows``: each
        request's last token row (default: row i is request i's only row)."""
        num_rows, num_refs, batch_size = len(token_ids), len(table.kv_indices), len(table.kv_last_page_len)
        if num_rows > self.rows or batch_size > self.max_batch_size or num_refs > self.max_page_refs:
            raise PlanError(f"a step of {num_rows} token rows of {batch_size} requests over {num_refs} pages exceeds "
                            f"rows={self.rows}, max_batch_size={self.max_batch_size} or max_page_refs={self.max_page_refs}")  # fmt: skip
        index, self._next = self._next, self._next ^ 1
        done = self._copy_done[index]
        if done is not None:
            done.synchronize()  # the copy from two steps ago has left this staging buffer
        host = self._staging[index].numpy()
        self._put(host, "token_ids", token_ids, 0)
        self._put(host, "positions", append.positions, 0)
        self._put(host, "batch_indices", append.batch_indices, -1)
        self._put(host, "last_rows", np.arange(num_rows, dtype=np.int32) if last_rows is None else last_rows, 0)
        self._put(host, "kv_indptr", table.kv_indptr, int(table.kv_indptr[-1]))
        used = self.offsets["kv_indices"][0] + num_refs
        host[self.offsets["kv_indices"][0] : used] = table.kv_indices
        self.words[:used].copy_(self._staging[index][:used], non_blocking=True)
        if done is not None:
            done.record(torch.cuda.current_stream(self.words.device))

    def _put(self, host: np.ndarray, name: str, values: np.ndarray, fill: int) -> None:
        start, stop = self.offsets[name]
        host[start : start + len(values)] = values
        host[start + len(values) : stop] = fill


class DecodeRunner:
    """One decode step of ``model`` over a batch: owns the KV cache, the BatchDecode every layer
    shares, the step buffers and (mode ``graphs``) the GraphRunner, captured at construction."""

    def __init__(self, model: LlamaDecoder, settings: Settings, mode: Mode = "graphs", show_progress: bool = False):
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        check_settings(model.config, settings)
        self.model, self.settings, self.mode = model, settings, mode
        device = model.device
        self.buffers = StepBuffers(settings, device)
        self.paged = PagedAttention(
            decode=BatchDecode(settings, device=device),
            kv_cache=allocate_kv_cache(model.config, settings, device),
            batch_indices=self.buffers.views["batch_indices"],
            kv_indptr=self.buffers.views["kv_indptr"],
            kv_indices=self.buffers.views["kv_indices"],
            check_values=device.type == "cpu" and mode != "graphs",
        )
        self.buckets = settings.graph_batch_sizes
        self.max_step_tokens: int | None = None  # one token row per request per step
        self.graphs: GraphRunner | None = None
        if mode == "graphs":
            example = self.buffers.inputs(1)
            self.graphs = GraphRunner(self.forward, example, attention=self.paged.decode, settings=settings)
            self.graphs.capture_all(show_progress=show_progress)

    @property
    def decode(self) -> BatchDecode:
        return self.paged.decode

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.forward(inputs, self.paged)

    def bucket_for(self, batch_size: int) -> int | None:
        index = bisect.bisect_left(self.buckets, batch_size)
        return self.buckets[index] if index < len(self.buckets) else None

    def step(self, token_ids: np.ndarray, append: AppendIndices, table: PageTable, qo_lens: Sequence[int] | None = None) -> torch.Tensor:
        """Logits float32 [B, vocab] of one step (a view the next step overwrites in mode graphs).

        token_ids int32 [B]: each request's token at ``append.positions``; ``append`` and ``table``
        from ``PagePool.allocate_step`` / ``page_table`` (one new token per request; ``qo_lens``, if
        given, must be all ones)."""
        batch_size = len(token_ids)
        if qo_lens is not None and any(n != 1 for n in qo_lens):
            raise InputError("DecodeRunner takes one token per request per step (use ChunkedRunner for prompt chunks)")
        self.buffers.load(token_ids, append, table)
        if self.graphs is not None:
            return self.graphs.run(self.buffers.inputs(batch_size), *table)
        rows = batch_size
        if self.mode == "eager_padded":
            rows = self.bucket_for(batch_size) or batch_size
        self.plan(table, [1] * batch_size, rows)
        return self.forward(self.buffers.inputs(rows))[:batch_size]

    def plan(self, table: PageTable, qo_lens: Sequence[int], rows: int | None = None) -> None:
        """Plan the attention of one step (``rows``: the padded row count; None: no padding)."""
        self.decode.plan(*table, padded_batch_size=rows)


@dataclass(frozen=True)
class Request:
    request_id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival_step: int = 0  # the first step it may join

    @property
    def final_kv_len(self) -> int:
        """Tokens in its KV when it finishes: the prompt and every generated token but the last."""
        return len(self.prompt) + self.max_new_tokens - 1


@dataclass
class _Running:
    request: Request
    num_fed: int = 0  # tokens fed so far (= its KV length)
    output: list[int] = field(default_factory=list)

    @property
    def prompt_left(self) -> int:
        return max(0, len(self.request.prompt) - self.num_fed)

    def next_tokens(self, n: int) -> list[int]:
        """The n tokens it feeds next: the rest of its prompt, or its last generated token."""
        prompt = self.request.prompt
        if self.num_fed < len(prompt):
            return list(prompt[self.num_fed : self.num_fed + n])
        return [self.output[-1]]


@dataclass
class LoopResult:
    tokens: dict[int, list[int]]  # request id -> greedy tokens (all of them, unless max_steps cut it)
    step_s: list[float]  # wall seconds of each step: pages, plan, upload, forward or replay, sampling
    batch_sizes: list[int]
    joined_at: dict[int, int]  # request id -> step it joined
    finished_at: dict[int, int]  # request id -> step it produced its last token
    token_steps: dict[int, list[int]] = field(default_factory=dict)  # request id -> step of each of its tokens
    step_tokens: list[int] = field(default_factory=list)  # token rows of each step

    @property
    def num_steps(self) -> int:
        return len(self.step_s)

    def _end_s(self, step: int) -> float:
        return float(np.sum(self.step_s[: step + 1]))

    def ttft_s(self, request_id: int) -> float:
        """Time to first token: loop seconds from the start of the step the request joined to the end
        of the step that sampled its first token (idle gaps between arrivals are not counted)."""
        steps = self.token_steps[request_id]
        joined = self.joined_at[request_id]
        return self._end_s(steps[0]) - (self._end_s(joined - 1) if joined else 0.0)

    def itl_s(self, request_id: int) -> float | None:
        """Mean inter-token latency: seconds between its first and last token over the gaps (None
        for a request with a single token)."""
        steps = self.token_steps[request_id]
        if len(steps) < 2:
            return None
        return (self._end_s(steps[-1]) - self._end_s(steps[0])) / (len(steps) - 1)


def serve(runner: "DecodeRunner | ChunkedRunner", requests: Sequence[Request], pool: PagePool | None = None,
          max_steps: int | None = None) -> LoopResult:  # fmt: skip
    """Run ``requests`` to completion (or ``max_steps`` steps, leaving the rest live in ``pool``).

    FIFO admission: a request joins at or after its ``arrival_step`` when the batch has room and
    the pool can hold every running request at its final length plus this one (so a step never
    runs out of pages). Finished requests leave and free their pages at the end of their step."""
    pool = pool if pool is not None else PagePool(runner.settings)
    _check_requests(requests, runner)
    waiting = deque(sorted(requests, key=lambda r: r.arrival_step))
    running: list[_Running] = []
    result = LoopResult({r.request_id: [] for r in requests}, [], [], {}, {}, {r.request_id: [] for r in requests})
    step = 0
    while (waiting or running) and (max_steps is None or result.num_steps < max_steps):
        _admit(waiting, running, pool, runner.settings, step, result.joined_at)
        if not running:
            if waiting[0].arrival_step <= step:
                raise PoolExhaustedError(f"request {waiting[0].request_id} cannot join an empty batch: the pool has "
                                         f"{pool.num_free_pages} free pages (it holds other requests)")  # fmt: skip
            step = waiting[0].arrival_step  # idle until the next arrival
            continue
        start = time.perf_counter()
        batch, counts = _schedule(running, runner.max_step_tokens)
        ids = [r.request.request_id for r in batch]
        append = pool.allocate_step(ids, counts)
        table = pool.page_table(ids)
        token_ids = np.array([t for r, n in zip(batch, counts) for t in r.next_tokens(n)], dtype=np.int32)
        next_tokens = runner.step(token_ids, append, table, counts).argmax(dim=-1).tolist()
        result.step_s.append(time.perf_counter() - start)
        result.batch_sizes.append(len(batch))
        result.step_tokens.append(len(token_ids))
        for r, n, token in zip(batch, counts, next_tokens):
            r.num_fed += n
            if r.num_fed >= len(r.request.prompt):  # a step inside the prompt: its logits are ignored
                r.output.append(token)
                result.token_steps[r.request.request_id].append(step)
        for r in [r for r in running if len(r.output) == r.request.max_new_tokens]:
            running.remove(r)
            pool.free(r.request.request_id)
            result.tokens[r.request.request_id] = r.output
            result.finished_at[r.request.request_id] = step
        step += 1
    for r in running:  # cut by max_steps: what they have so far
        result.tokens[r.request.request_id] = r.output
    return result


def _schedule(running: list[_Running], max_step_tokens: int | None) -> tuple[list[_Running], list[int]]:
    """Who feeds how many token rows this step: with no token budget, every running request one;
    else decoding requests one each, then prompt chunks in arrival order until the budget is spent
    (a request left with 0 rows sits the step out)."""
    if max_step_tokens is None:
        return running, [1] * len(running)
    counts = {id(r): 1 for r in running if r.prompt_left == 0}
    budget = max_step_tokens - len(counts)
    for r in running:
        if r.prompt_left and budget > 0:
            counts[id(r)] = min(r.prompt_left, budget)
            budget -= counts[id(r)]
    batch = [r for r in running if id(r) in counts]
    return batch, [counts[id(r)] for r in batch]


def _check_requests(requests: Sequence[Request], runner: DecodeRunner) -> None:
    config, seen = runner.model.config, set()
    for r in requests:
        if r.request_id in seen:
            raise InputError(f"request id {r.request_id} appears twice")
        seen.add(r.request_id)
        if not r.prompt or r.max_new_tokens < 1:
            raise InputError(f"request {r.request_id} needs a non-empty prompt and max_new_tokens >= 1")
        if r.final_kv_len > config.max_position:
            raise InputError(f"request {r.request_id} reaches position {r.final_kv_len - 1}; the model's "
                             f"max_position is {config.max_position}")  # fmt: skip
        if min(r.prompt) < 0 or max(r.prompt) >= config.vocab_size:
            raise InputError(f"request {r.request_id} has a token outside [0, vocab_size={config.vocab_size})")


def _pages_at_finish(request: Request, page_size: int) -> int:
    return -(-request.final_kv_len // page_size)


def _admit(waiting: deque[Request], running: list[_Running], pool: PagePool, settings: Settings, step: int,
           joined_at: dict[int, int]) -> None:  # fmt: skip
    ps = settings.page_size
    final_pages = sum(_pages_at_finish(r.request, ps) for r in running)
    still_needed = final_pages - sum(len(pool.pages(r.request.request_id)) for r in running if r.request.request_id in pool)
    while waiting and waiting[0].arrival_step <= step and len(running) < settings.max_batch_size:
        need = _pages_at_finish(waiting[0], ps)
        if need > min(pool.max_num_pages, settings.max_page_refs):
            raise PoolExhaustedError(f"request {waiting[0].request_id} needs {need} pages at its final length; "
                                     f"the pool has {pool.max_num_pages}, a batch may reference {settings.max_page_refs}")  # fmt: skip
        if need > pool.num_free_pages - still_needed or final_pages + need > settings.max_page_refs:
            return  # waits for pages to be freed
        request = waiting.popleft()
        running.append(_Running(request))
        joined_at[request.request_id] = step
        final_pages += need
        still_needed += need


def attention_error(runner: "DecodeRunner | ChunkedRunner", pool: PagePool, token_ids: Sequence[int]) -> float:
    """One more eager step for the pool's live requests that stops at layer 0's attention output and
    compares it with the float64 reference over the cache gathered from the page table (the step's
    own k/v included). ``token_ids``: any tokens, in pool order (the check ends their decoding).
    Returns the relative error."""
    if runner.mode != "eager":
        raise InputError("attention_error needs a runner in mode 'eager'")
    ids = pool.request_ids
    append = pool.allocate_step(ids)
    table = pool.page_table(ids)
    runner.buffers.load(np.asarray(token_ids, dtype=np.int32), append, table)
    runner.plan(table, [1] * len(ids))
    q, out = runner.model.first_layer_attention(runner.buffers.inputs(len(ids)), runner.paged)
    expected, _ = decode_reference(q, runner.paged.kv_cache[0], runner.settings, *table)
    return relative_error(out, expected)
