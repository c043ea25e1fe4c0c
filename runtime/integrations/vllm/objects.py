"""The tilegraph attention objects behind the vLLM backend, shared by every layer of a process.

One ``BatchPrefill`` per (Shape, features): it serves mixed prefill and decode rows in one plan,
planned once per step (the metadata's ``step``) and reused by every layer with that shape. Its
Settings bounds grow to the next power of two when a step needs more. Variant values (cap, window,
sinks, ALiBi slopes) are run-time parameters passed with each layer's call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import pydantic
import torch

from tilegraph import variants
from tilegraph.errors import InputError
from tilegraph.integrations._hf_objects import Bounds
from tilegraph.prefill import BatchPrefill
from tilegraph.settings import Settings


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


@dataclass
class Held:
    attention: BatchPrefill
    bounds: Bounds
    step: int | None = None


_VARIANTS: dict[Features, variants.Variant | None] = {}
_HELD: dict[tuple[Shape, Features], Held] = {}


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


def held_for(shape: Shape, features: Features, need: Bounds) -> Held:
    """The shared object for (shape, features), rebuilt with grown bounds if ``need`` exceeds them."""
    held = _HELD.get((shape, features))
    if held is None or not held.bounds.covers(need):
        bounds = (held.bounds if held is not None else Bounds(16, 16, 16, 16)).grown_to(need)
        attention = BatchPrefill(settings_for(shape, bounds), causal=True, device=shape.device, variant=variant_for(features))
        held = Held(attention, bounds)
        _HELD[(shape, features)] = held
    return held


def planned(held: Held, step: int, table: Any) -> BatchPrefill:
    """``held``'s object, planned for ``step`` unless it already is."""
    if held.step != step:
        held.step = None
        held.attention.plan(*table)
        held.step = step
    return held.attention


def clear() -> None:
    _HELD.clear()
