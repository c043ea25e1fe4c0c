"""The tilegraph attention objects behind the transformers backend (transformers is not imported here).

``AttentionObjects`` keeps one object per (kind, Shape, Features, window): kind is decode, ragged
prefill or paged prefill; Features says which variants a layer needs (soft-cap, sliding window,
sinks), so full and windowed layers of one model each keep their own object and plan. It grows an
object's Settings bounds when a batch needs more and plans it only when the plan's key changes --
once per forward, shared by every layer of that kind. The variants' values (cap, window, each
layer's sinks) are run-time parameters passed with every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pydantic
import torch

from tilegraph import variants
from tilegraph.decode import BatchDecode
from tilegraph.errors import InputError
from tilegraph.prefill import BatchPrefill, BatchPrefillRagged
from tilegraph.settings import Settings

from .bounds import Bounds


class Shape(NamedTuple):
    """What fixes an attention object's kernels: heads, head_dim, pages, scale, dtype, device."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    sm_scale: float
    dtype: torch.dtype
    device: torch.device


class Features(NamedTuple):
    """The variants a layer's attention needs; their values come with each call (``params``)."""

    soft_cap: bool = False
    window: bool = False
    sinks: bool = False


@dataclass
class _Held:
    attention: Any
    bounds: Bounds
    plan_key: tuple[Any, ...] | None = None


_VARIANTS: dict[Features, variants.Variant | None] = {}


def variant_for(features: Features) -> variants.Variant | None:
    """One Variant per feature set (made once per process: a Variant checks its hooks when made)."""
    if features not in _VARIANTS:
        parts = []
        if features.soft_cap:
            parts.append(variants.soft_cap())
        if features.window:
            parts.append(variants.sliding_window(-1))
        if features.sinks:
            parts.append(variants.attention_sinks())
        _VARIANTS[features] = None if not parts else parts[0] if len(parts) == 1 else variants.combine(*parts, name="hf")
    return _VARIANTS[features]


class AttentionObjects:
    """One tilegraph attention object per (kind, Shape, Features, window), planned when its key changes."""

    def __init__(self) -> None:
        self._held: dict[tuple[Any, ...], _Held] = {}

    def clear(self) -> None:
        self._held.clear()

    def get(self, kind: str, shape: Shape, features: Features, window_left: int, need: Bounds) -> _Held:
        slot = (kind, shape, features, window_left)
        held = self._held.get(slot)
        if held is None or not held.bounds.covers(need):
            bounds = (held.bounds if held is not None else Bounds(16, 16, 16, 16)).grown_to(need)
            held = _Held(_build(kind, _settings(shape, bounds), shape.device, variant_for(features)), bounds)
            self._held[slot] = held
        return held

    @staticmethod
    def plan(held: _Held, key: tuple[Any, ...], make_plan: Callable[[Any], object]) -> Any:
        """Plan ``held`` with ``make_plan(attention)`` unless its current plan has this key."""
        if held.plan_key != key:
            held.plan_key = None
            make_plan(held.attention)
            held.plan_key = key
        return held.attention


def _settings(shape: Shape, bounds: Bounds) -> Settings:
    try:
        return Settings(
            num_qo_heads=shape.num_qo_heads,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            page_size=shape.page_size,
            kv_layout="NHD",
            dtype=shape.dtype,
            sm_scale=shape.sm_scale,
            max_batch_size=bounds.batch,
            max_num_tokens=bounds.tokens,
            max_num_pages=bounds.pages,
            max_page_refs=bounds.page_refs,
        )
    except pydantic.ValidationError as error:
        raise InputError(f"the attention call does not fit tilegraph: {error}") from error


def _build(kind: str, settings: Settings, device: torch.device, variant: variants.Variant | None) -> Any:
    if kind == "decode":
        return BatchDecode(settings, device=device, variant=variant)
    if kind == "ragged":
        return BatchPrefillRagged(settings, causal=True, device=device, variant=variant)
    if kind == "paged":
        return BatchPrefill(settings, causal=True, device=device, variant=variant)
    raise ValueError(f"unknown attention kind {kind!r}")
