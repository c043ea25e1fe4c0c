"""The per-step attention metadata the builder hands to every layer of one KV cache group."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .page_table import PageTable

_STEPS = itertools.count()


@dataclass
class TilegraphMetadata:
    """One step: the host page table (planned once per attention object, shared by every layer)."""

    num_actual_tokens: int  # query rows with a request (rows past it are padding: output left 0)
    max_query_len: int
    table: PageTable
    slot_mapping: torch.Tensor
    step: int = field(default_factory=lambda: next(_STEPS))  # the plan key
