"""The per-step attention metadata the builder hands to every layer of one KV cache group."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .page_table import StepLengths

_STEPS = itertools.count()


@dataclass
class TilegraphMetadata:
    """One step: host lengths and vLLM's device block table (planned once per attention object,
    shared by every layer). ``decode``: every request has one query token (vLLM's
    trailing CUDA-graph padding requests aside), so the step runs on
    BatchDecode with fixed buffers (what vLLM's CUDA graphs replay); otherwise BatchPrefill."""

    num_actual_tokens: int  # query rows with a request (rows past it are padding: output left 0)
    max_query_len: int
    lengths: StepLengths
    block_table: torch.Tensor  # [rows >= num_reqs, max_blocks] int32 on the cache's device, read in place
    slot_mapping: torch.Tensor
    group: tuple[str, ...] = ()  # the layers of the builder's KV cache group (the objects' key)
    max_batch: int = 0  # vLLM's max_num_seqs: the decode object's batch bound (never regrown under a graph)
    step: int = field(default_factory=lambda: next(_STEPS))  # the plan key

    @property
    def num_reqs(self) -> int:
        return int(self.lengths.seq_lens.shape[0])

    @property
    def decode(self) -> bool:
        return self.lengths.uniform_decode
