"""``tilegraph.CascadeAttention``: multi-level cascade attention -- shared prefixes stored and read once.

    cascade = tilegraph.CascadeAttention(settings, num_levels=2, causal=False, device="cuda")
    plan = cascade.plan([
        LevelTable(group_qo_indptr, prefix_kv_indptr, prefix_kv_indices, prefix_last_page_len),  # level 0
        LevelTable(qo_indptr, suffix_kv_indptr, suffix_kv_indices, suffix_last_page_len),        # last level
    ])
    out = cascade.run(q, kv_cache)                        # q [nnz_q, Hq, D] -> out [nnz_q, Hq, D]
    out, lse = cascade.run(q, kv_cache, return_lse=True)  # lse float32 [nnz_q, Hq], natural log

Every level is a page table over *entries* that partition the same query rows: ``qo_indptr`` says
which rows each entry owns, the KV columns which pages it attends. The last level's entries are the
requests (each request's own suffix); every earlier level's entries are groups of whole entries of
the next level, whose queries all attend one shared prefix, stored and read once per group. A
group that shares nothing has no pages. Row i's result equals flat attention over the
concatenation, level 0 first, of the KV of every entry containing it.

Each level runs as one BatchPrefill (a group's rows form one prefill request over the group's
prefix), and the levels' (out, LSE) states are merged in place with ``merge_state_in_place``
(an empty level gives LSE -inf and contributes nothing). ``causal``: the last level is causally
masked (aligned to the end of the suffix; every prefix level is fully visible). A request with
more query rows than suffix tokens is allowed (FlashInfer's semantics, per level): its first
qo_len - suffix_len rows see no suffix key, the last level gives them LSE -inf, and they attend the
shared levels only.

All levels are planned by one ``plan()`` call, all or nothing: every error is raised before any
level's plan is staged, and the previous plan then stays in force. Variants (``variant=``, a ``tilegraph.Variant``): the result is flat attention with that variant
over the concatenated KV. Every level sees the flat positions: kv token j of an entry at level l
is at kv_pos = (the KV lengths of the request's entries at levels < l) + j, query row i of a
request at qo_pos = (its total KV length) - qo_len + i (the prefill kernel's caller positions,
uploaded with the plans). Supported: logits transforms and masks (soft-cap, ALiBi, sliding
window, user hooks of positions and heads), query / key transforms and pair transforms (RoPE),
per-head and scalar parameters, sinks (only the last level's prefill applies the sink, so it joins
each row's denominator once) and softmax-free variants (levels' outputs are summed; no LSE).
Refused with InputError: output transforms (they would run once per level, before the merge),
the custom mask and any per-request ("request"-shaped) parameter (a shared level's entries are
groups, not requests). A hook's ``request`` argument is the entry index of the level (the request
only at the last level). ``run(..., params=...)`` / ``set_params`` write the parameters of every
level.

Every level's plan lives in one
fixed buffer fed by one ``StagedUpload``: a step's plans reach the device in ONE async copy, on the
stream of the next run or replay. Implements the graph protocol
(``tilegraph.graphs.protocol.GraphAware``); its bucket is the padded query-row count.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from tilegraph.errors import InputError, PlanError, StateError
from tilegraph.graphs.protocol import PlanState
from tilegraph.nvtx_ranges import plan_range
from tilegraph.planner.prefill import PrefillPlan
from tilegraph.planner.prefill_layout import H_NUM_TOKENS

from ._device import resolve_device
from .attention import next_plan_serial, padded_rows, resolve_num_ctas
from .cascade_tables import CascadePlan, LevelTable, check_cascade_variant, check_groups, check_level_tables, request_kv_len
from .checks import check_bucket
from .kv_cache import KVCache, paged_kv
from .merge import merge_state_in_place
from .prefill import BatchPrefill, prefill_layout
from .settings import Settings
from .variant import Variant
from .workspace import StagedUpload


class CascadeAttention:
    """Shared-prefix attention over ``num_levels`` page tables (CUDA-graph safe: fixed launch shapes)."""

    def __init__(
        self,
        settings: Settings,
        num_levels: int,
        causal: bool = False,
        device: str | torch.device | None = None,
        variant: Variant | None = None,
    ) -> None:
        if not isinstance(settings, Settings):
            raise InputError(f"settings must be a tilegraph.Settings, got {type(settings).__name__}")
        check_cascade_variant(variant)
        if isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer)) or num_levels < 1:
            raise InputError(f"num_levels must be an integer >= 1, got {num_levels!r}")
        if num_levels > settings.max_cascade_levels:
            raise PlanError(f"num_levels={num_levels} exceeds max_cascade_levels={settings.max_cascade_levels} (Settings)")
        self.settings = settings
        self.num_levels = int(num_levels)
        if not isinstance(causal, (bool, np.bool_)):
            raise InputError(f"causal must be a bool, got {causal!r}")
        self.causal = bool(causal)
        last = self.num_levels - 1
        dev = resolve_device(device)
        level_words = prefill_layout(settings, resolve_num_ctas(settings, dev), paged=True).plan_words
        # every level's plan lives in one staged buffer: a step's plans reach the device in ONE copy
        # with a variant, the flat positions follow the plans in the same buffer: one qo_pos per query
        # row, then per level one kv offset per entry (max_batch_size >= max_cascade_groups entries)
        self.variant = variant
        self._positions_at = self.num_levels * level_words
        entries = settings.max_batch_size
        extra = settings.max_num_tokens + self.num_levels * entries if variant is not None else 0
        self._upload = StagedUpload(self.num_levels * level_words + extra, dev)
        self.levels = [
            BatchPrefill(settings, causal=self.causal and level == last, device=dev, plan_upload=(self._upload, level * level_words),
                         variant=None if variant is None else (variant if level == last else variant.without_sink()))  # fmt: skip
            for level in range(self.num_levels)
        ]
        if variant is not None:
            words, at = self._upload.device_words, self._positions_at
            row_qo_pos = words[at : at + settings.max_num_tokens]
            for index, level in enumerate(self.levels):
                start = at + settings.max_num_tokens + index * entries
                level.bind_positions(row_qo_pos, words[start : start + entries])
        self.device = self.levels[0].device
        # level 0's query-row count as the device sees it (its uploaded plan header): the merge mask
        self._num_tokens_on_device = self.levels[0].workspace.sections["header"][H_NUM_TOKENS]
        self._plan: CascadePlan | None = None
        self._capturing = False

    @property
    def workspace_nbytes(self) -> int:
        return sum(level.workspace_nbytes for level in self.levels)

    @property
    def current_plan(self) -> CascadePlan | None:
        return self._plan

    # ---- plan ------------------------------------------------------------------------------------

    @plan_range
    def plan(self, levels: Sequence[LevelTable], padded_num_tokens: int | None = None) -> CascadePlan:
        """Validate every level, plan each, then stage all of them for upload (nothing is staged when
        any level is wrong). ``levels``: ``num_levels`` LevelTables (or 4-tuples), level 0 first,
        the last level one entry per request. ``padded_num_tokens`` (>= the query rows, <=
        max_num_tokens): q/out then have that many rows; rows past the real ones are neither read
        nor written."""
        if self._capturing:
            raise StateError("plan() was called while a CUDA graph capture is in progress: plan before capturing or replaying")
        tables = check_level_tables(levels, self.num_levels)
        qo = [t[0] for t in tables]
        num_tokens = check_groups(qo)
        self._check_bounds(qo)
        if num_tokens > self.settings.max_num_tokens:
            raise PlanError(f"levels[-1].qo_indptr[-1]={num_tokens} query rows exceed max_num_tokens={self.settings.max_num_tokens} (Settings)")
        rows = padded_rows(padded_num_tokens, "padded_num_tokens", num_tokens, "query rows",
                           self.settings.max_num_tokens, "max_num_tokens")  # fmt: skip
        serial = next_plan_serial()  # one serial for every level: see graph_plan_state
        plans = tuple(self._plan_level(index, table, serial) for index, table in enumerate(tables))
        for level, plan in zip(self.levels, plans):
            level.stage_prefill_plan(plan, rows)
        kv_len = np.stack([request_kv_len(qo[index], qo[-1], tables[index], self.settings.page_size)
                           for index in range(self.num_levels)])  # fmt: skip
        if self.variant is not None:
            self._stage_positions(qo, kv_len)
        self._plan = CascadePlan(plans, num_tokens, tuple(len(q) - 1 for q in qo), kv_len)
        return self._plan

    def _stage_positions(self, qo: list[np.ndarray], kv_len: np.ndarray) -> None:
        """Stage the flat positions: qo_pos of every query row, each level's per-entry kv offset."""
        requests = qo[-1].astype(np.int64)
        qo_len = np.diff(requests)
        total = kv_len.sum(axis=0)
        row_request = np.repeat(np.arange(len(qo_len)), qo_len)
        rows = np.arange(int(requests[-1]), dtype=np.int64)
        row_qo_pos = total[row_request] - qo_len[row_request] + (rows - requests[:-1][row_request])
        at = self._positions_at
        self._upload.stage(at, row_qo_pos.astype(np.int32))
        before = np.cumsum(kv_len, axis=0) - kv_len  # [level, request]: KV tokens at earlier levels
        for index, indptr in enumerate(qo):
            starts = indptr[:-1].astype(np.int64)
            owner = np.clip(np.searchsorted(requests, starts, side="right") - 1, 0, max(len(qo_len) - 1, 0))
            offsets = before[index][owner] if len(qo_len) else np.zeros(len(starts), np.int64)
            start = at + self.settings.max_num_tokens + index * self.settings.max_batch_size
            self._upload.stage(start, np.where(np.diff(indptr) > 0, offsets, 0).astype(np.int32))

    def set_params(self, params: dict[str, Any]) -> None:
        """The variant's run-time parameters, written for every level (checked on every level first)."""
        if self.variant is None:
            raise InputError("set_params(): this CascadeAttention has no variant")
        if self._capturing:
            raise StateError("set_params() (or run(params=...)) during a CUDA graph capture: set them before capturing or replaying")
        checked = [level.check_params(params) for level in self.levels]  # every level checked before any write
        for level, values in zip(self.levels, checked):
            level.write_checked_params(values)

    def _check_bounds(self, qo: list[np.ndarray]) -> None:
        s = self.settings
        for index, indptr in enumerate(qo[:-1]):
            if len(indptr) - 1 > s.max_cascade_groups:
                raise PlanError(f"levels[{index}] has {len(indptr) - 1} groups > max_cascade_groups={s.max_cascade_groups} (Settings)")
        if len(qo[-1]) - 1 > s.max_batch_size:
            raise PlanError(f"levels[-1] has {len(qo[-1]) - 1} requests > max_batch_size={s.max_batch_size} (Settings)")

    def _plan_level(self, index: int, table: tuple[np.ndarray, ...], serial: int) -> PrefillPlan:
        """Level ``index``'s prefill plan (host only: nothing staged); its errors name the level."""
        level = self.levels[index]
        try:
            return level.make_plan(*table, serial=serial)
        except (InputError, PlanError) as err:
            raise type(err)(f"levels[{index}]: {err}") from None

    # ---- run -------------------------------------------------------------------------------------

    def run(
        self,
        q: torch.Tensor,
        kv_cache: KVCache,
        out: torch.Tensor | None = None,
        return_lse: bool = False,
        params: dict[str, Any] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Cascade attention of ``q`` [nnz_q, num_qo_heads, head_dim] over every level's pages of
        ``kv_cache`` (any form BatchPrefill takes). Returns ``out`` [nnz_q, Hq, D] (Settings dtype)
        and, with ``return_lse``, the natural-log LSE float32 [nnz_q, Hq]. Everything is checked
        before the first launch: a bad argument writes nothing. ``params``: the variant's run-time
        parameters (as ``set_params``; they persist)."""
        if self._plan is None:
            raise StateError("run() was called before plan(): plan the batch first")
        softmax = self.variant is None or self.variant.softmax
        if return_lse and not softmax:
            raise InputError(f"return_lse=True: variant {self.variant.name!r} is softmax-free and has no LSE")  # type: ignore[union-attr]
        if params is not None:
            self.set_params(params)
        missing = sorted({n for level in self.levels for n in level.missing_params})
        if missing:
            raise InputError(f"variant {self.variant.name!r} needs params {missing}: pass run(..., params={{...}})")  # type: ignore[union-attr]
        first = self.levels[0]
        first.check_q(q)
        kv = paged_kv(kv_cache, self.settings, self.device)
        max_page = max(p.max_page_index for p in self._plan.levels)
        if max_page >= kv.num_pages:
            raise InputError(f"kv_cache has {kv.num_pages} pages but the plan references page {max_page}")
        if out is None:
            s = self.settings
            out = torch.empty((first.rows, s.num_qo_heads, s.head_dim), dtype=s.torch_dtype, device=self.device)
        first.check_out(out)
        if not softmax:
            # softmax-free: every level's output is a plain sum over its KV, so the levels add up
            first.run(q, kv_cache, out=out)
            if self.num_levels > 1:
                real = (torch.arange(out.shape[0], device=self.device) < self._num_tokens_on_device)[:, None, None]
                total = out.float()
                for level in self.levels[1:]:
                    total = total + level.run(q, kv_cache).float()
                out.copy_(torch.where(real, total.to(out.dtype), out))
            return out
        _, lse = first.run(q, kv_cache, out=out, return_lse=True)
        if self.num_levels > 1:
            # rows past the real ones (a padded bucket) hold no state: the merges leave them alone
            real_rows = torch.arange(out.shape[0], device=self.device) < self._num_tokens_on_device
            for level in self.levels[1:]:
                level_out, level_lse = level.run(q, kv_cache, return_lse=True)
                merge_state_in_place(out, lse, level_out, level_lse, mask=real_rows)
        return (out, lse) if return_lse else out

    # ---- graph protocol (tilegraph.graphs.protocol.GraphAware); the bucket is the padded row count --

    def graph_prepare_capture(self, num_tokens: int) -> None:
        """A stand-in plan for a row bucket: at every level one entry of ``num_tokens`` rows over as
        many KV tokens, every page reference page 0."""
        num_tokens = check_bucket(num_tokens, "num_tokens", self.settings.max_num_tokens, "max_num_tokens")
        pages = -(-num_tokens // self.settings.page_size)
        last = num_tokens - (pages - 1) * self.settings.page_size if pages else 1
        table = LevelTable(np.array([0, num_tokens], np.int32), np.array([0, pages], np.int32),
                           np.zeros(pages, np.int32), np.array([last], np.int32))  # fmt: skip
        self.plan([table] * self.num_levels, padded_num_tokens=num_tokens)

    def graph_set_capturing(self, capturing: bool) -> None:
        self._capturing = capturing
        for level in self.levels:
            level.graph_set_capturing(capturing)

    def graph_buffers(self) -> dict[str, torch.Tensor]:
        return {f"level{i}:{name}": t for i, level in enumerate(self.levels) for name, t in level.graph_buffers().items()}

    def graph_plan_state(self) -> PlanState:
        """Fresh only when every level was planned since the last replay: the levels of one cascade
        plan share its serial, so the oldest level's serial is the cascade's."""
        states = [level.graph_plan_state() for level in self.levels]
        key = f"cascade:{self.num_levels}:{'causal' if self.causal else 'full'}|" + "|".join(s.key for s in states)
        return PlanState(serial=min(s.serial for s in states), padded_batch_size=states[0].padded_batch_size, key=key)

    def graph_before_replay(self) -> None:
        self._upload.flush()  # every level's plan, one copy

    def graph_max_rows(self) -> tuple[int, str]:
        """The most query rows a cascade plan has, and the Settings field bounding them."""
        return self.settings.max_num_tokens, "max_num_tokens"


__all__ = ["CascadeAttention", "CascadePlan", "LevelTable"]
