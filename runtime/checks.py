"""Tensor checks shared by the attention objects: raised before any launch, naming the argument."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from .errors import InputError, PlanError
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


def check_bucket(value: Any, name: str, bound: int, bound_label: str) -> int:
    """A graph bucket's row count: an integer in [0, bound] (InputError naming ``name`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= bound:
        raise InputError(f"{name} must be an integer in [0, Settings.{bound_label}={bound}], got {value!r}")
    return int(value)


def check_on_device(named: dict[str, Any], device: torch.device) -> None:
    """Every tensor in ``named`` (a tensor, or a tuple/list of them such as a (k_cache, v_cache)
    pair) lives on ``device``. Checked before the custom op dispatches: a ``meta`` tensor would
    otherwise reach the op's fake implementation and silently do nothing."""
    for name, value in named.items():
        tensors = value if isinstance(value, (tuple, list)) else (value,)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device != device:
                what = " (a meta tensor has no data: kernels cannot read or write it)" if t.device.type == "meta" else ""
                raise InputError(f"{name} is on {t.device}, the attention object runs on {device}{what}")


def available_bytes(device: torch.device) -> tuple[int, int]:
    """(free bytes on ``device``, free host bytes): the GPU's free memory and the host's available
    RAM (on the simulator both are host RAM)."""
    host = _host_available_bytes()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), host
    return host, host


def _host_available_bytes() -> int:
    """MemAvailable (free plus reclaimable page cache) from /proc/meminfo, else free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


_CAPACITY_FIELDS = ("max_page_refs", "max_batch_size", "max_num_tokens", "num_ctas")


def _layout_bytes(layout: Any) -> tuple[int, int]:
    """(device bytes, host staging bytes) a Workspace for ``layout`` allocates."""
    return int(layout.workspace_nbytes), 2 * 4 * int(layout.plan_words)


def check_workspace_fits(layout: Any, device: torch.device) -> None:
    """Refuse (PlanError, before anything is allocated) a workspace the device or host cannot hold,
    naming the bytes and the Settings capacity that contributes most to them."""
    device_bytes, host_bytes = _layout_bytes(layout)
    free_device, free_host = available_bytes(device)
    on_host = device.type != "cuda"
    need_device = device_bytes + (host_bytes if on_host else 0)
    too_big = need_device > free_device or (not on_host and host_bytes > free_host)
    if not too_big:
        return
    shares = {}
    for name in _CAPACITY_FIELDS:
        if hasattr(layout, name) and getattr(layout, name) > 1:
            small = dataclasses.replace(layout, **{name: 1})
            shares[name] = sum(_layout_bytes(layout)) - sum(_layout_bytes(small))
    field = max(shares, key=shares.get) if shares else "max_page_refs"
    where = "host memory (the simulator's device)" if on_host else f"{device}"
    raise PlanError(
        f"Settings.{field}={getattr(layout, field)} sizes a workspace of {device_bytes} device bytes plus "
        f"{host_bytes} host staging bytes ({field} accounts for {shares.get(field, 0)} of them), but {where} "
        f"has {free_device} bytes free{'' if on_host else f' and the host {free_host}'}: lower {field}"
    )
