"""What a transformers attention call asks for, in tilegraph's terms (transformers is not imported here).

``batch_layout`` reads the 4-D mask of one call once per forward: which KV positions of each row are
real (not padding), which queries are real, and the ragged offsets of both. ``AttentionObjects``
keeps one tilegraph attention object per (kind, shape, scale, dtype, device), grows its Settings
bounds when a batch needs more, and plans it only when the plan's key changes -- once per forward,
shared by every layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pydantic
import torch

from tilegraph.decode import BatchDecode
from tilegraph.errors import InputError
from tilegraph.prefill import BatchPrefill, BatchPrefillRagged
from tilegraph.settings import Settings


@dataclass(frozen=True)
class BatchLayout:
    """The real tokens of one attention call over a [B, q_len] query and a [B, kv_len] KV window.

    Query j of a row sits at KV position kv_len - q_len + j. The real KV positions of a row are
    compacted in order; its real queries are the real KV positions among the last q_len, so
    tilegraph's causal mask (aligned to the end of each row's compacted KV) is the mask's own."""

    key: tuple[Any, ...]  # everything a plan depends on
    batch_size: int
    q_len: int
    kv_len: int
    q_rows: torch.Tensor  # int64 [nnz_q]: row of each real query, rows in order
    q_cols: torch.Tensor  # int64 [nnz_q]: its index among the call's q_len queries
    kv_rows: torch.Tensor  # int64 [nnz_kv]: row of each real KV position
    kv_cols: torch.Tensor  # int64 [nnz_kv]: the position
    qo_indptr: np.ndarray  # int32 [B+1]: real queries per row, as offsets
    kv_indptr: np.ndarray  # int32 [B+1]: real KV positions per row, as offsets
    new_counts: np.ndarray  # int64 [B]: real queries per row
    past_counts: np.ndarray  # int64 [B]: real KV positions before the call's queries

    @property
    def num_queries(self) -> int:
        return int(self.qo_indptr[-1])

    @property
    def num_kv(self) -> int:
        return int(self.kv_indptr[-1])


_last_mask: list[Any] = [None, None, None]  # weakref to the last mask, its version, its layout


def batch_layout(mask: torch.Tensor | None, batch_size: int, q_len: int, kv_len: int, device: torch.device) -> BatchLayout:
    """The layout the mask describes; the same mask object (every layer of a forward) is read once."""
    if mask is not None:
        ref, version, layout = _last_mask
        if ref is not None and ref() is mask and version == mask._version and layout.key[:3] == (batch_size, q_len, kv_len):
            return layout
    valid = _valid_kv(mask, batch_size, q_len, kv_len)
    layout = _layout_from_valid(valid.cpu(), q_len, device)
    if mask is not None:
        _last_mask[:] = [weakref.ref(mask), mask._version, layout]
    return layout


def _valid_kv(mask: torch.Tensor | None, batch_size: int, q_len: int, kv_len: int) -> torch.Tensor:
    """bool [B, kv_len]: the real KV positions, after checking the mask is causal plus padding."""
    if q_len > kv_len:
        raise InputError(f"the call has {q_len} queries but only {kv_len} key/value positions")
    if mask is None:
        return torch.ones(batch_size, kv_len, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"attention_mask must be a 4-D [B, 1, q_len, kv_len] tensor (what register()'s mask function builds), got {shape}")
    if mask.shape[0] not in (1, batch_size) or tuple(mask.shape[1:]) != (1, q_len, kv_len):
        raise InputError(f"attention_mask has shape {tuple(mask.shape)}, expected [{batch_size}, 1, {q_len}, {kv_len}]")
    allowed = _allowed(mask)[:, 0].expand(batch_size, q_len, kv_len)
    valid = allowed[:, -1, :]  # the last query sees every real position under causal + padding
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    if not torch.equal(allowed, valid[:, None, :] & causal):
        raise InputError(
            "attention_mask is not a causal mask with padding (e.g. packed sequences, a sliding window, "
            "bidirectional blocks or a custom 4-D mask): the tilegraph backend serves causal attention over "
            "padded rows only"
        )
    return valid


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True: attend) from a boolean one or an additive float one (0 or -inf-like)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise InputError(f"attention_mask has dtype {mask.dtype}: expected bool or an additive float mask")
    allowed = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((allowed | blocked).all()):
        raise InputError("attention_mask adds a bias (values other than 0 and -inf): the tilegraph backend has no additive bias")
    return allowed


def _layout_from_valid(valid: torch.Tensor, q_len: int, device: torch.device) -> BatchLayout:
    batch_size, kv_len = valid.shape
    q_valid = valid[:, kv_len - q_len :]
    new_counts = q_valid.sum(1).numpy()
    kv_counts = valid.sum(1).numpy()
    q_rows, q_cols = q_valid.nonzero(as_tuple=True)
    kv_rows, kv_cols = valid.nonzero(as_tuple=True)
    return BatchLayout(
        key=(batch_size, q_len, kv_len, np.packbits(valid.numpy()).tobytes()),
        batch_size=batch_size,
        q_len=q_len,
        kv_len=kv_len,
        q_rows=q_rows.to(device),
        q_cols=q_cols.to(device),
        kv_rows=kv_rows.to(device),
        kv_cols=kv_cols.to(device),
        qo_indptr=_offsets(new_counts),
        kv_indptr=_offsets(kv_counts),
        new_counts=new_counts.astype(np.int64),
        past_counts=(kv_counts - new_counts).astype(np.int64),
    )


def _offsets(counts: np.ndarray) -> np.ndarray:
    indptr = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=indptr[1:])
    return indptr


class Shape(NamedTuple):
    """What fixes an attention object's kernels: heads, head_dim, pages, scale, dtype, device."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    sm_scale: float
    dtype: torch.dtype
    device: torch.device


class Bounds(NamedTuple):
    """Settings capacities a batch needs (requests, query tokens, page indices, page references)."""

    batch: int
    tokens: int
    pages: int
    page_refs: int

    def covers(self, need: "Bounds") -> bool:
        return all(have >= want for have, want in zip(self, need))

    def grown_to(self, need: "Bounds") -> "Bounds":
        """Each field raised to the next power of two that covers the need (few workspace rebuilds)."""
        return Bounds(*(max(have, _power_of_two(want)) for have, want in zip(self, need)))


def _power_of_two(value: int) -> int:
    return max(16, 1 << (int(value) - 1).bit_length())


@dataclass
class _Held:
    attention: Any
    bounds: Bounds
    plan_key: tuple[Any, ...] | None = None


class AttentionObjects:
    """One tilegraph attention object per (kind, Shape), planned only when its plan key changes."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, Shape], _Held] = {}

    def clear(self) -> None:
        self._held.clear()

    def get(self, kind: str, shape: Shape, need: Bounds) -> _Held:
        held = self._held.get((kind, shape))
        if held is None or not held.bounds.covers(need):
            bounds = (held.bounds if held is not None else Bounds(16, 16, 16, 16)).grown_to(need)
            held = _Held(_build(kind, _settings(shape, bounds), shape.device), bounds)
            self._held[(kind, shape)] = held
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


def _build(kind: str, settings: Settings, device: torch.device) -> Any:
    if kind == "decode":
        return BatchDecode(settings, device=device)
    if kind == "ragged":
        return BatchPrefillRagged(settings, causal=True, device=device)
    if kind == "paged":
        return BatchPrefill(settings, causal=True, device=device)
    raise ValueError(f"unknown attention kind {kind!r}")
