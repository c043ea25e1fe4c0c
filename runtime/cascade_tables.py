"""What a cascade plans from: its level tables, their checks, the refused variants, and the plan's
statistics (``CascadePlan``). ``tilegraph.cascade`` re-exports ``LevelTable`` and ``CascadePlan``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tilegraph.errors import InputError
from tilegraph.planner.prefill import PrefillPlan
from tilegraph.planner.validation import as_index_array

from .settings import Settings
from .variant import Variant


@dataclass(frozen=True)
class LevelTable:
    """One cascade level: ``qo_indptr`` [G+1] (the query rows of each of its G entries),
    ``kv_indptr`` [G+1], ``kv_indices`` [nnz_pages], ``kv_last_page_len`` [G] (each entry's pages,
    as for decode). int32 CPU torch tensors or numpy arrays."""

    qo_indptr: Any
    kv_indptr: Any
    kv_indices: Any
    kv_last_page_len: Any


@dataclass(frozen=True)
class CascadePlan:
    """The plans of one cascade batch. ``request_kv_len`` int64 [num_levels, num_requests]: the KV
    tokens each request attends at each level (a flat plan would read them all, per request)."""

    levels: tuple[PrefillPlan, ...]
    num_tokens: int  # query rows (qo_indptr[-1] of every level)
    groups: tuple[int, ...]  # entries per level (the last level's are the requests)
    request_kv_len: np.ndarray

    @property
    def serial(self) -> int:
        return self.levels[0].serial  # every level's plan carries the same serial

    @property
    def num_requests(self) -> int:
        return self.groups[-1]

    @property
    def kv_tokens(self) -> int:
        """KV tokens the cascade reads (per KV head): each entry's KV once."""
        return sum(p.kv_tokens for p in self.levels)

    @property
    def flat_kv_tokens(self) -> int:
        """KV tokens flat attention over the concatenated KV would read (per KV head)."""
        return int(self.request_kv_len.sum())

    def kv_bytes(self, settings: Settings, flat: bool = False) -> int:
        """Bytes of K and V read (the cascade's, or with ``flat`` flat attention's), all KV heads."""
        per_token = 2 * settings.num_kv_heads * settings.head_dim * settings.torch_dtype.itemsize
        return per_token * (self.flat_kv_tokens if flat else self.kv_tokens)

    def __repr__(self) -> str:
        return (f"CascadePlan(#{self.serial}: {self.num_requests} requests, {self.num_tokens} query rows, "
                f"groups per level {list(self.groups)}, KV tokens {self.kv_tokens} vs flat {self.flat_kv_tokens})")  # fmt: skip


def check_level_tables(levels: Any, num_levels: int) -> list[tuple[np.ndarray, ...]]:
    """``levels`` (LevelTables or 4-tuples) as int32 arrays per level, checked for shape and order."""
    if not isinstance(levels, (list, tuple)):
        raise InputError(f"levels must be a list of LevelTable, got {type(levels).__name__}")
    if len(levels) != num_levels:
        raise InputError(f"levels has {len(levels)} page tables, this CascadeAttention has num_levels={num_levels}")
    tables = []
    for index, level in enumerate(levels):
        if isinstance(level, (list, tuple)) and len(level) == 4:
            level = LevelTable(*level)
        if not isinstance(level, LevelTable):
            raise InputError(f"levels[{index}] must be a LevelTable(qo_indptr, kv_indptr, kv_indices, kv_last_page_len)")
        names = ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len")
        arrays = tuple(as_index_array(getattr(level, n), f"levels[{index}].{n}") for n in names)
        qo_indptr, kv_indptr, _, last = arrays
        if qo_indptr.shape[0] < 1:
            raise InputError(f"levels[{index}].qo_indptr must have G + 1 >= 1 entries")
        groups = qo_indptr.shape[0] - 1
        if kv_indptr.shape[0] != groups + 1:
            raise InputError(f"levels[{index}].kv_indptr has {kv_indptr.shape[0]} entries but levels[{index}].qo_indptr "
                             f"has {groups + 1}: the page table and the query rows must describe the same entries")  # fmt: skip
        if last.shape[0] != groups:
            raise InputError(f"levels[{index}].kv_last_page_len has {last.shape[0]} entries, levels[{index}] has {groups}")
        if qo_indptr[0] != 0:
            raise InputError(f"levels[{index}].qo_indptr[0] must be 0, got {qo_indptr[0]}")
        if np.any(np.diff(qo_indptr) < 0):
            raise InputError(f"levels[{index}].qo_indptr must be non-decreasing")
        tables.append(arrays)
    return tables



def check_cascade_variant(variant: Any) -> None:
    """Refuse what a cascade cannot make equal to flat attention (see the module doc)."""
    if variant is None:
        return
    if not isinstance(variant, Variant):
        raise InputError(f"variant must be a tilegraph.Variant, got {type(variant).__name__}")
    label = f"CascadeAttention: variant {variant.name!r}"
    if variant.has_hook("output_transform"):
        raise InputError(f"{label} has an output transform, which a cascade cannot apply: it would run on each "
                         "level's output before the merge, not once on the merged row")  # fmt: skip
    if variant.has_encoded_inputs:
        raise InputError(f"{label} takes encoded per-request inputs {list(variant.input_names)} (the custom mask): "
                         "unsupported by CascadeAttention, whose shared levels' entries are groups, not requests")  # fmt: skip
    per_request = [p.name for p in variant.params if p.shape == "request"]
    if per_request:
        raise InputError(f"{label} has per-request parameters {per_request}: unsupported by CascadeAttention "
                         "(a shared level's entries are groups of requests, not requests)")  # fmt: skip


def check_groups(qo: list[np.ndarray]) -> int:
    """Every level covers the same query rows, and each group holds whole entries of the next level.
    Returns the number of query rows."""
    requests = qo[-1]
    num_tokens = int(requests[-1])
    for index, indptr in enumerate(qo[:-1]):
        end = int(indptr[-1])
        if end < num_tokens:
            request = int(np.searchsorted(requests, end, side="right")) - 1
            raise InputError(f"levels[{index}].qo_indptr ends at row {end} but the requests' rows end at {num_tokens}: "
                             f"request {request} (rows {requests[request]}:{requests[request + 1]}) is in no group of "
                             f"level {index} (give a request that shares no prefix a group without pages)")  # fmt: skip
        if end > num_tokens:
            raise InputError(f"levels[{index}].qo_indptr ends at row {end}, past the requests' last row {num_tokens} "
                             "(levels[-1].qo_indptr[-1])")  # fmt: skip
        finer = qo[index + 1]
        cuts = ~np.isin(indptr, finer)
        if cuts.any():
            g = int(np.argmax(cuts))
            row = int(indptr[g])
            e = int(np.searchsorted(finer, row, side="right")) - 1
            raise InputError(f"levels[{index}].qo_indptr[{g}]={row} cuts through entry {e} of levels[{index + 1}] "
                             f"(rows {finer[e]}:{finer[e + 1]}): every group must hold whole entries of the next level")  # fmt: skip
    return num_tokens


def request_kv_len(group_qo: np.ndarray, request_qo: np.ndarray, table: tuple[np.ndarray, ...], page_size: int) -> np.ndarray:
    """int64 [num_requests]: the KV tokens each request attends at one level -- its group's (the last
    level: its own entry's). A request with no query rows attends nothing: 0 (its group is not
    defined by rows, and flat attention would read nothing for it either)."""
    _, kv_indptr, _, last = table
    pages = np.diff(kv_indptr.astype(np.int64))
    entry_len = np.where(pages > 0, (pages - 1) * page_size + last, 0).astype(np.int64)
    request_qo = request_qo.astype(np.int64)
    num_requests = len(request_qo) - 1
    if len(entry_len) == 0 or num_requests == 0:
        return np.zeros(num_requests, np.int64)
    if len(group_qo) == len(request_qo) and np.array_equal(group_qo, request_qo):
        lengths = entry_len  # the last level: entry r is request r
    else:
        entry = np.searchsorted(group_qo, request_qo[:-1], side="right") - 1
        lengths = entry_len[np.clip(entry, 0, len(entry_len) - 1)]
    return np.where(np.diff(request_qo) > 0, lengths, 0).astype(np.int64)
