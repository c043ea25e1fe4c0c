"""What a transformers attention call asks for, in tilegraph's terms (transformers is not imported here).

``read_mask`` reads a call's 4-D mask once (one device-to-host copy): which queries are real and at
which KV position the call's queries start (``offset``: the end of the KV for dynamic caches,
``cache_position`` inside ``max_cache_len`` for static ones -- read off the mask's diagonal).
``batch_layout`` then picks each row's real KV positions, compacts them in order, and checks that
tilegraph's mask over the compacted rows -- causal, aligned to the end, optionally a sliding window
of ``window_left`` keys before each query -- is exactly the mask's own on every real query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tilegraph.errors import InputError


@dataclass(frozen=True)
class MaskView:
    """A call's mask on the host: allowed [B, q_len, kv_len], real queries [B, q_len], query offset."""

    allowed: np.ndarray
    real_q: np.ndarray
    offset: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.allowed.shape  # type: ignore[return-value]


@dataclass(frozen=True)
class BatchLayout:
    """The real tokens of one attention call over a [B, q_len] query and a [B, kv_len] KV window.

    Query j of a row sits at KV position offset + j. The real KV positions of a row are compacted
    in order and its real queries are the last of them, so tilegraph's causal mask (aligned to the
    end of each row's compacted KV) and its window (counted in compacted positions) are the mask's."""

    key: tuple[Any, ...]  # everything a plan depends on
    batch_size: int
    q_len: int
    kv_len: int
    offset: int
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


def read_mask(mask: torch.Tensor | None, batch_size: int, q_len: int, kv_len: int) -> MaskView:
    """The mask on the host, its query offset and real queries (InputError for what is not a mask)."""
    if q_len > kv_len:
        raise InputError(f"the call has {q_len} queries but only {kv_len} key/value positions")
    if mask is None:
        causal = np.tril(np.ones((q_len, kv_len), dtype=bool), kv_len - q_len)
        return MaskView(np.broadcast_to(causal, (batch_size, q_len, kv_len)), np.ones((batch_size, q_len), bool), kv_len - q_len)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"attention_mask must be a 4-D [B, 1, q_len, kv_len] tensor (what register()'s mask function builds), got {shape}")
    if mask.shape[0] not in (1, batch_size) or tuple(mask.shape[1:]) != (1, q_len, kv_len):
        raise InputError(f"attention_mask has shape {tuple(mask.shape)}, expected [{batch_size}, 1, {q_len}, {kv_len}]")
    allowed = np.broadcast_to(_allowed(mask)[:, 0].cpu().numpy(), (batch_size, q_len, kv_len))
    offset = _query_offset(allowed)
    real_q = allowed[:, np.arange(q_len), offset + np.arange(q_len)]  # a real query sees its own position
    return MaskView(allowed, np.ascontiguousarray(real_q), offset)


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


def _query_offset(allowed: np.ndarray) -> int:
    """Where query 0 sits: a real query's last allowed position is its own, a padded one's is earlier."""
    _, q_len, kv_len = allowed.shape
    seen = allowed.any(axis=2)
    if not seen.any():
        return kv_len - q_len
    last = kv_len - 1 - np.argmax(allowed[:, :, ::-1], axis=2)
    offset = int((last - np.arange(q_len))[seen].max())
    if offset + q_len > kv_len:
        raise InputError(
            f"attention_mask lets a query see KV positions past the last query's ({offset} + {q_len} queries > {kv_len} "
            "positions): not a causal mask"
        )
    return offset


def batch_layout(view: MaskView, window_left: int, device: torch.device, stored: np.ndarray | None = None) -> BatchLayout:
    """The layout of a call whose mask is ``view``; ``window_left`` < 0: no window. ``stored``: bool
    [B, kv_len], the KV positions a paged cache holds (None: the positions some real query sees)."""
    allowed, real_q, offset = view.allowed, view.real_q, view.offset
    batch_size, q_len, kv_len = allowed.shape
    q_pos = offset + np.arange(q_len)
    if stored is None:
        valid = (allowed & real_q[:, :, None]).any(axis=1)
    else:
        valid = stored.copy()
        valid[:, offset : offset + q_len] |= real_q
    _check(allowed, real_q, valid, q_pos, window_left)
    new_counts = real_q.sum(1)
    kv_counts = valid.sum(1)
    q_rows, q_cols = np.nonzero(real_q)
    kv_rows, kv_cols = np.nonzero(valid)

    def on_device(index: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(index.astype(np.int64)).to(device)

    return BatchLayout(
        key=(batch_size, q_len, kv_len, offset, np.packbits(valid).tobytes(), np.packbits(real_q).tobytes()),
        batch_size=batch_size,
        q_len=q_len,
        kv_len=kv_len,
        offset=offset,
        q_rows=on_device(q_rows),
        q_cols=on_device(q_cols),
        kv_rows=on_device(kv_rows),
        kv_cols=on_device(kv_cols),
        qo_indptr=_offsets(new_counts),
        kv_indptr=_offsets(kv_counts),
        new_counts=new_counts.astype(np.int64),
        past_counts=(kv_counts - new_counts).astype(np.int64),
    )


def _check(allowed: np.ndarray, real_q: np.ndarray, valid: np.ndarray, q_pos: np.ndarray, window_left: int) -> None:
    """The mask of every real query equals tilegraph's over the compacted row (InputError otherwise)."""
    rows, cols = np.nonzero(real_q)
    if rows.size == 0:
        return
    compact = np.cumsum(valid, axis=1) - 1  # compacted index of each real KV position
    kv_counts = valid.sum(1)
    new_counts = real_q.sum(1)
    rank = np.cumsum(real_q, axis=1)[rows, cols] - 1  # k-th real query of its row
    kernel_pos = (kv_counts - new_counts)[rows] + rank  # where tilegraph places it
    if not np.array_equal(compact[rows, q_pos[cols]], kernel_pos):
        raise InputError(
            "attention_mask: a row's real queries are not its last real key/value positions (keys after a query, "
            "or a cache that holds tokens the mask calls padding)"
        )
    distance = kernel_pos[:, None] - compact[rows]
    expected = valid[rows] & (distance >= 0)
    if window_left >= 0:
        expected &= distance <= window_left
    if not np.array_equal(expected, allowed[rows, cols]):
        window = f" and a sliding window of {window_left + 1} (sliding_window)" if window_left >= 0 else ""
        raise InputError(
            f"attention_mask is not a causal mask with padding{window} (e.g. packed sequences, bidirectional "
            "blocks, a custom 4-D mask, or a window over a row with padding inside it): the tilegraph backend "
            "serves causal attention over padded rows only"
        )


def _offsets(counts: np.ndarray) -> np.ndarray:
    indptr = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=indptr[1:])
    return indptr
