"""The transformers backend's attention as two torch custom ops (with fake implementations), so a
``torch.compile``d model traces each layer's attention as one opaque call: reading the mask, the
layout, planning and the page bookkeeping all run eagerly inside, on real tensors, every call.

``tilegraph_hf::dense_attention``: K/V dense ``[B, H_kv, kv_len, D]`` (dynamic, static and sliding
caches, no cache): the real positions are gathered into ragged rows (ONE copy of the KV per call),
then ragged prefill, or decode over one-token pages. ``tilegraph_hf::paged_attention``: the
``TilegraphCache`` layer named by ``layer_ref`` appends the call's real tokens to its pages, then
paged prefill or decode reads them in place. Both return ``[B, q_len, Hq, D]`` (padded queries 0).

Both are tagged ``cudagraph_unsafe``: their host work (the mask, the plan) must run on every call,
so ``mode="reduce-overhead"`` keeps them out of its CUDA graphs (tilegraph's own GraphRunner is the
way to replay tilegraph attention in a graph). A mask's layout is read once per forward: every layer of a forward gets the same mask object, and a
call whose ``layer_idx`` does not increase starts a new forward (nothing is reused across forwards).
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import numpy as np
import torch

from tilegraph.append import append_kv

from ._hf_batch import BatchLayout, batch_layout, read_mask
from ._hf_cache import layer_for
from ._hf_objects import AttentionObjects, Features, Shape
from .bounds import Bounds

ATTENTION_OBJECTS = AttentionObjects()  # shared by every model that uses the backend


class _ForwardLayouts:
    """Layouts of the current forward's masks, by (mask identity, window, sizes)."""

    def __init__(self) -> None:
        self.last_layer = -1
        self.entries: dict[tuple[Any, ...], tuple[Any, Any, BatchLayout]] = {}

    def get(self, mask: torch.Tensor | None, layer_idx: int, window_left: int, sizes: tuple[int, int, int], device: torch.device) -> BatchLayout:
        if layer_idx < 0 or layer_idx <= self.last_layer:
            self.entries.clear()
        self.last_layer = layer_idx
        slot = (id(mask), window_left, sizes)
        version = _version(mask)
        held = self.entries.get(slot)
        if mask is not None and held is not None and held[0]() is mask and held[1] == version:
            return held[2]
        layout = batch_layout(read_mask(mask, *sizes), window_left, device)
        if mask is not None:
            self.entries[slot] = (weakref.ref(mask), version, layout)
        return layout

    def clear(self) -> None:
        self.last_layer = -1
        self.entries.clear()


def _version(mask: torch.Tensor | None) -> int | None:
    try:
        return None if mask is None else mask._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


FORWARD_LAYOUTS = _ForwardLayouts()


def _shape(query: torch.Tensor, key: torch.Tensor, scale: float, page_size: int) -> Shape:
    return Shape(query.shape[1], key.shape[1], query.shape[3], page_size, float(scale), query.dtype, query.device)


def _params(features: Features, soft_cap: float, window_left: int, sinks: torch.Tensor | None) -> dict[str, Any] | None:
    params: dict[str, Any] = {}
    if features.soft_cap:
        params["logits_soft_cap"] = float(soft_cap)
    if features.window:
        params["window_left"] = float(window_left)
    if features.sinks:
        params["sinks"] = sinks
    return params or None


def _features(soft_cap: float, window_left: int, sinks: torch.Tensor | None) -> Features:
    return Features(soft_cap=soft_cap > 0, window=window_left >= 0, sinks=sinks is not None)


def _all_decode(layout: BatchLayout) -> bool:
    """One real query in every row: a decode step (else prefill, which also serves rows with none)."""
    return layout.q_len == 1 and layout.num_queries == layout.batch_size


@torch.library.custom_op("tilegraph_hf::dense_attention", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Optional[torch.Tensor],
    sinks: Optional[torch.Tensor],
    scale: float,
    window_left: int,
    soft_cap: float,
    layer_idx: int,
) -> torch.Tensor:
    """Attention over dense K/V: query [B, Hq, q_len, D], key/value [B, H_kv, kv_len, D] -> [B, q_len, Hq, D]."""
    batch_size, num_qo_heads, q_len, head_dim = query.shape
    layout = FORWARD_LAYOUTS.get(mask, layer_idx, window_left, (batch_size, q_len, key.shape[2]), query.device)
    out = query.new_zeros(batch_size, q_len, num_qo_heads, head_dim)
    if layout.num_queries == 0:
        return out
    features = _features(soft_cap, window_left, sinks)
    params = _params(features, soft_cap, window_left, sinks)
    k = key.transpose(1, 2)[layout.kv_rows, layout.kv_cols]  # [nnz_kv, H_kv, D], contiguous: the one copy
    v = value.transpose(1, 2)[layout.kv_rows, layout.kv_cols]
    plan_key = ("dense", layout.key)
    if _all_decode(layout):
        need = Bounds(batch_size, batch_size, layout.num_kv, layout.num_kv)
        held = ATTENTION_OBJECTS.get("decode", _shape(query, key, scale, 1), features, window_left, need)
        pages = np.arange(layout.num_kv, dtype=np.int32)
        last = np.ones(batch_size, dtype=np.int32)
        decode = ATTENTION_OBJECTS.plan(held, plan_key, lambda obj: obj.plan(layout.kv_indptr, pages, last))
        one_token_pages = (k.unsqueeze(1), v.unsqueeze(1))  # NHD pages of one token: [nnz_kv, 1, H_kv, D]
        return decode.run(query[:, :, 0, :], one_token_pages, params=params).unsqueeze(1)
    need = Bounds(batch_size, max(layout.num_queries, 1), 1, 1)
    held = ATTENTION_OBJECTS.get("ragged", _shape(query, key, scale, 1), features, window_left, need)
    ragged = ATTENTION_OBJECTS.plan(held, plan_key, lambda obj: obj.plan(layout.qo_indptr, layout.kv_indptr))
    q = query.transpose(1, 2)[layout.q_rows, layout.q_cols]
    out[layout.q_rows, layout.q_cols] = ragged.run(q, k, v, params=params)
    return out


@dense_attention.register_fake
def _(query, key, value, mask, sinks, scale, window_left, soft_cap, layer_idx):
    batch_size, num_qo_heads, q_len, head_dim = query.shape
    return query.new_empty(batch_size, q_len, num_qo_heads, head_dim)


@torch.library.custom_op("tilegraph_hf::paged_attention", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    sinks: Optional[torch.Tensor],
    layer_ref: torch.Tensor,
    scale: float,
    window_left: int,
    soft_cap: float,
) -> torch.Tensor:
    """Append the call's real tokens (key/value [B, H_kv, q_len, D]) to the pages of the TilegraphCache
    layer ``layer_ref`` names, then attention over them -> [B, q_len, Hq, D]. The pages are the
    layer's own state (never a graph tensor), so nothing a compiled graph holds is mutated."""
    layer = layer_for(layer_ref)
    cache = layer.cache
    batch_size, num_qo_heads, q_len, head_dim = query.shape
    step, layout = cache.step_for_layer(layer, mask, window_left, batch_size, q_len)
    pages = layer.kv_pages
    assert pages is not None and cache.settings is not None
    if layout.num_queries:
        k_new = key.transpose(1, 2)[layout.q_rows, layout.q_cols]  # the new tokens only
        v_new = value.transpose(1, 2)[layout.q_rows, layout.q_cols]
        append_kv(k_new, v_new, pages, step.batch_indices, step.positions, step.kv_indptr, step.kv_indices, cache.settings)
    features = _features(soft_cap, window_left, sinks)
    params = _params(features, soft_cap, window_left, sinks)
    shape = _shape(query, key, scale, cache.page_size)
    refs = max(len(step.table.kv_indices), 1)
    table = step.table
    if _all_decode(layout):
        held = ATTENTION_OBJECTS.get("decode", shape, features, window_left, Bounds(batch_size, batch_size, cache.max_num_pages, refs))
        decode = ATTENTION_OBJECTS.plan(held, step.key, lambda obj: obj.plan(*table))
        return decode.run(query[:, :, 0, :], pages, params=params).unsqueeze(1)
    out = query.new_zeros(batch_size, q_len, num_qo_heads, head_dim)
    if layout.num_queries == 0:
        return out
    need = Bounds(batch_size, max(layout.num_queries, 1), cache.max_num_pages, refs)
    held = ATTENTION_OBJECTS.get("paged", shape, features, window_left, need)
    prefill = ATTENTION_OBJECTS.plan(held, step.key, lambda obj: obj.plan(layout.qo_indptr, *table))
    q = query.transpose(1, 2)[layout.q_rows, layout.q_cols]
    out[layout.q_rows, layout.q_cols] = prefill.run(q, pages, params=params)
    return out


@paged_attention.register_fake
def _(query, key, value, mask, sinks, layer_ref, scale, window_left, soft_cap):
    batch_size, num_qo_heads, q_len, head_dim = query.shape
    return query.new_empty(batch_size, q_len, num_qo_heads, head_dim)
