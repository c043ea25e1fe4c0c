"""``ChunkedRunner``: serving steps that send prompts through ``BatchPrefill`` in chunks, alongside the
running decodes, eagerly or under CUDA graphs bucketed by token rows.

    runner = ChunkedRunner(LlamaDecoder(config, device), settings, mode="graphs", max_step_tokens=256)
    result = serve(runner, requests)         # tilegraph.serving.serve schedules the chunks

A step is T token rows of B requests: a decoding request feeds one row (its last token), a
prefilling one a chunk of its prompt. Every layer appends the T rows' K/V and runs ONE causal
``BatchPrefill`` launch over all B requests (request r's rows are the last qo_len_r positions of
its KV; a decode row is a request with qo_len 1, which the prefill kernel serves in the same
launch), then the logits of each request's last row are kept. One launch rather than a decode
launch plus a prefill launch: it is the cheaper schedule on the simulator and a single graph
dimension (token rows) to bucket on; splitting decode rows onto the decode kernel is a choice
for the static performance model to make once it can compare the two.

Modes as ``DecodeRunner``'s: ``eager`` (T rows), ``eager_padded`` (eager on the bucket's rows,
the bit-exact twin of a replay) and ``graphs`` (``GraphRunner`` over token buckets; above the
largest bucket a step runs eagerly).
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np
import torch

from tilegraph.errors import InputError
from tilegraph.graphs.runner import GraphRunner
from tilegraph.page_pool import AppendIndices, PageTable
from tilegraph.prefill import BatchPrefill
from tilegraph.settings import Settings

from .llama import LlamaDecoder, PagedAttention, allocate_kv_cache, check_settings
from .loop import MODES, Mode, StepBuffers


def default_token_buckets(max_step_tokens: int) -> list[int]:
    """Token-row buckets: powers of two below ``max_step_tokens``, then ``max_step_tokens`` itself."""
    buckets, size = [], 1
    while size < max_step_tokens:
        buckets.append(size)
        size *= 2
    return buckets + [max_step_tokens]


class ChunkedRunner:
    """One mixed prefill/decode step of ``model``: owns the KV cache, the BatchPrefill every layer
    shares, the step buffers and (mode ``graphs``) the GraphRunner over token buckets, captured at
    construction. ``max_step_tokens`` (default and upper bound ``Settings.max_num_tokens``; at least
    ``max_batch_size``, so every decoding request fits a step): token rows per step."""

    def __init__(self, model: LlamaDecoder, settings: Settings, mode: Mode = "graphs", max_step_tokens: int | None = None,
                 buckets: Sequence[int] | None = None, show_progress: bool = False) -> None:  # fmt: skip
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        check_settings(model.config, settings)
        budget = settings.max_num_tokens if max_step_tokens is None else max_step_tokens
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
            raise InputError(f"max_step_tokens must be an integer, got {max_step_tokens!r}")
        if not settings.max_batch_size <= budget <= settings.max_num_tokens:
            raise InputError(f"max_step_tokens={budget} must lie in [max_batch_size={settings.max_batch_size}, "
                             f"max_num_tokens={settings.max_num_tokens}] (every decoding request needs a row each step)")  # fmt: skip
        self.model, self.settings, self.mode = model, settings, mode
        self.max_step_tokens = int(budget)
        device = model.device
        self.buffers = StepBuffers(settings, device, rows=self.max_step_tokens)
        self.paged = PagedAttention(
            decode=None,
            prefill=BatchPrefill(settings, causal=True, device=device),
            kv_cache=allocate_kv_cache(model.config, settings, device),
            batch_indices=self.buffers.views["batch_indices"],
            kv_indptr=self.buffers.views["kv_indptr"],
            kv_indices=self.buffers.views["kv_indices"],
            check_values=device.type == "cpu" and mode != "graphs",
        )
        self.buckets = tuple(sorted(set(buckets))) if buckets is not None else tuple(default_token_buckets(self.max_step_tokens))
        self.graphs: GraphRunner | None = None
        if mode == "graphs":
            example = self.buffers.inputs(1, last_rows=True)
            self.graphs = GraphRunner(self.forward, example, attention=self.prefill, settings=settings, buckets=self.buckets)
            self.graphs.capture_all(show_progress=show_progress)

    @property
    def prefill(self) -> BatchPrefill:
        return self.paged.prefill  # type: ignore[return-value]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.forward(inputs, self.paged)

    def bucket_for(self, num_rows: int) -> int | None:
        index = bisect.bisect_left(self.buckets, num_rows)
        return self.buckets[index] if index < len(self.buckets) else None

    def plan(self, table: PageTable, qo_lens: Sequence[int], rows: int | None = None) -> None:
        """Plan one step: request r feeds qo_lens[r] rows (``rows``: the padded row count)."""
        qo_indptr = np.zeros(len(qo_lens) + 1, dtype=np.int32)
        np.cumsum(qo_lens, out=qo_indptr[1:])
        self.prefill.plan(qo_indptr, *table, padded_num_tokens=rows)

    def step(self, token_ids: np.ndarray, append: AppendIndices, table: PageTable, qo_lens: Sequence[int]) -> torch.Tensor:
        """Logits float32 [B, vocab] of each request's last row (a view the next step overwrites in
        mode graphs). token_ids int32 [T]: request 0's rows, then request 1's ...; ``append`` and
        ``table`` from ``PagePool.allocate_step(ids, qo_lens)`` / ``page_table(ids)``."""
        qo_lens = [int(n) for n in qo_lens]
        num_rows, batch_size = len(token_ids), len(qo_lens)
        if sum(qo_lens) != num_rows or min(qo_lens, default=1) < 1:
            raise InputError(f"qo_lens {qo_lens} must be positive and add up to the step's {num_rows} token rows")
        last_rows = (np.cumsum(qo_lens) - 1).astype(np.int32)
        self.buffers.load(token_ids, append, table, last_rows)
        if self.graphs is not None:
            plan = lambda padded: self.plan(table, qo_lens, padded)  # noqa: E731
            return self.graphs.step(self.buffers.inputs(num_rows, last_rows=True), plan)[:batch_size]
        rows = num_rows
        if self.mode == "eager_padded":
            rows = self.bucket_for(num_rows) or num_rows
        self.plan(table, qo_lens, rows)
        return self.forward(self.buffers.inputs(rows, last_rows=True))[:batch_size]


__all__ = ["ChunkedRunner", "default_token_buckets"]
