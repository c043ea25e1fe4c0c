"""Tensor checks shared by the attention objects: raised before any launch, naming the argument."""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError
from .settings import Settings


def check_q(q: Any, settings: Settings, device: torch.device, rows: int, rows_label: str, rows_mismatch: str) -> torch.Tensor:
    """q [rows, num_qo_heads, head_dim] of the Settings dtype on ``device``; last dim contiguous;
    pointer and dim-0/1 strides 16-byte aligned (q may be a strided view, e.g. of a fused QKV).
    ``rows_mismatch`` is formatted with ``got`` and ``want`` when the row count differs."""
    s = settings
    if not isinstance(q, torch.Tensor):
        raise InputError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype != s.torch_dtype:
        raise InputError(f"q has dtype {q.dtype}, Settings.dtype is {s.dtype}")
    if q.device != device:
        raise InputError(f"q is on {q.device}, the attention object runs on {device}")
    if q.dim() != 3 or tuple(q.shape[1:]) != (s.num_qo_heads, s.head_dim):
        raise InputError(f"q must be [{rows_label}, num_qo_heads={s.num_qo_heads}, head_dim={s.head_dim}], got {tuple(q.shape)}")
    if q.shape[0] != rows:
        raise InputError(rows_mismatch.format(got=q.shape[0], want=rows))
    if q.stride(2) != 1:
        raise InputError("q's last dimension must be contiguous (stride 1)")
    item = q.element_size()
    if q.data_ptr() % 16 or (q.stride(0) * item) % 16 or (q.stride(1) * item) % 16:
        raise InputError("q must be 16-byte aligned: its data pointer and its strides of dims 0 and 1 (in bytes)")
    return q


def check_out(out: Any, settings: Settings, device: torch.device, rows: int) -> torch.Tensor:
    """out [rows, num_qo_heads, head_dim], contiguous and 16-byte aligned, Settings dtype, on ``device``."""
    s = settings
    shape = (rows, s.num_qo_heads, s.head_dim)
    if not isinstance(out, torch.Tensor):
        raise InputError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != s.torch_dtype:
        raise InputError(f"out has dtype {out.dtype}, Settings.dtype is {s.dtype}")
    if out.device != device:
        raise InputError(f"out is on {out.device}, the attention object runs on {device}")
    if tuple(out.shape) != shape:
        raise InputError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if not out.is_contiguous() or out.data_ptr() % 16:
        raise InputError("out must be contiguous and 16-byte aligned")
    return out


def span_words(q: torch.Tensor) -> torch.Tensor:
    """A flat int32 view of the storage q spans (q may be strided; its strides are passed separately)."""
    span = (q.shape[0] - 1) * q.stride(0) + (q.shape[1] - 1) * q.stride(1) + q.shape[2]
    per_word = 4 // q.element_size()
    span = -(-span // per_word) * per_word
    return torch.as_strided(q, (span,), (1,), q.storage_offset()).view(torch.int32)
