"""The tilegraph attention objects behind the vLLM backend, shared by the layers of a KV cache group.

Per (group, Shape, Features, kind) one object: ``BatchDecode`` for steps whose requests all have one
query token (fixed buffers: what vLLM's CUDA graphs capture and replay), ``BatchPrefill`` for mixed
prefill / decode steps (eager). Layers with run-time variant values (cap, window, sinks, ALiBi
slopes) get an object each, since the values live in the object's fixed params buffer that a graph
replays in place. Both plan on vLLM's device block table (only host lengths are read) and upload the
plan at once (``graph_before_replay``), so a graph captured after it replays the step's plan. Settings
bounds grow to the next power of two when a step needs more; a decode object is sized for vLLM's
max_num_seqs when made, so it is not rebuilt under a captured graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import pydantic
import torch

from tilegraph import variants
from tilegraph.decode import BatchDecode
from tilegraph.errors import InputError
from tilegraph.integrations.bounds import Bounds
from tilegraph.prefill import BatchPrefill
from tilegraph.settings import Settings

from .metadata import TilegraphMetadata


class Shape(NamedTuple):
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    sm_scale: float
    dtype: torch.dtype
    device: torch.device


class Features(NamedTuple):
    soft_cap: bool = False
    window: bool = False
    sinks: bool = False
    alibi: bool = False


class Key(NamedTuple):
    group: tuple[str, ...]
    shape: Shape
    features: Features
    decode: bool
    layer: int  # 0: shared by the group's layers without run-time values, else the layer's own


@dataclass
class Held:
    attention: BatchPrefill | BatchDecode
    bounds: Bounds
    step: int | None = None


_VARIANTS: dict[Features, variants.Variant | None] = {}
_HELD: dict[Key, Held] = {}


def variant_for(features: Features) -> variants.Variant | None:
    """One Variant per feature set, made once per process; values come as params."""
    if features not in _VARIANTS:
        parts = []
        if features.soft_cap:
            parts.append(variants.soft_cap())
        if features.window:
            parts.append(variants.sliding_window(-1))
        if features.sinks:
            parts.append(variants.attention_sinks())
        if features.alibi:
            parts.append(variants.alibi())
        _VARIANTS[features] = None if not parts else parts[0] if len(parts) == 1 else variants.combine(*parts, name="vllm")
    return _VARIANTS[features]


def settings_for(shape: Shape, bounds: Bounds) -> Settings:
    try:
        return Settings(
            num_qo_heads=shape.num_qo_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
            page_size=shape.page_size, kv_layout="NHD", dtype=shape.dtype, sm_scale=shape.sm_scale,
            max_batch_size=bounds.batch, max_num_tokens=bounds.tokens,
            max_num_pages=bounds.pages, max_page_refs=bounds.page_refs,
        )  # fmt: skip
    except pydantic.ValidationError as error:
        raise InputError(f"the vLLM attention layer does not fit tilegraph: {error}") from error


def need_for(meta: TilegraphMetadata, num_pages: int) -> Bounds:
    """The bounds ``meta``'s step needs over a cache of ``num_pages`` blocks (a decode object: at
    least meta.max_batch requests with full block-table rows, so graph-sized batches fit)."""
    if meta.decode:
        batch = max(meta.num_reqs, meta.max_batch, 1)
        return Bounds(batch, batch, num_pages, batch * max(meta.block_table.shape[1], 1))
    return Bounds(max(meta.num_reqs, 1), max(meta.num_actual_tokens, 1), num_pages, max(meta.lengths.page_refs, 1))


def held_for(key: Key, need: Bounds) -> Held:
    """The object for ``key``, rebuilt with grown bounds if ``need`` exceeds them."""
    held = _HELD.get(key)
    if held is None or not held.bounds.covers(need):
        bounds = (held.bounds if held is not None else Bounds(16, 16, 16, 16)).grown_to(need)
        settings, variant = settings_for(key.shape, bounds), variant_for(key.features)
        if key.decode:
            attention = BatchDecode(settings, device=key.shape.device, variant=variant)
        else:
            attention = BatchPrefill(settings, causal=True, device=key.shape.device, variant=variant)
        held = Held(attention, bounds)
        _HELD[key] = held
    return held


def planned(held: Held, meta: TilegraphMetadata) -> BatchPrefill | BatchDecode:
    """``held``'s object planned for ``meta``'s step (unless it already is), its plan uploaded now."""
    if held.step != meta.step:
        held.step = None
        lengths = meta.lengths
        if isinstance(held.attention, BatchDecode):
            held.attention.plan_block_table(meta.block_table, lengths.seq_lens)
        else:
            held.attention.plan_block_table(lengths.qo_indptr, meta.block_table, lengths.seq_lens)
        held.attention.graph_before_replay()  # the one upload, outside any graph vLLM captures next
        held.step = meta.step
    return held.attention


def plan_group(meta: TilegraphMetadata) -> int:
    """Plan every object of ``meta``'s group and kind for its step (the builder's call, before vLLM
    runs or replays the step); returns how many. Objects are made by the layers' first forward."""
    count = 0
    for key in [k for k in _HELD if k.group == meta.group and k.decode == meta.decode]:
        held = held_for(key, need_for(meta, _HELD[key].bounds.pages))
        planned(held, meta)
        count += 1
    return count


def clear() -> None:
    _HELD.clear()
