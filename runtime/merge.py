"""Merging attention states: ``merge_state``, ``merge_state_in_place``, ``merge_states``.

A state is an attention output ``v`` (normalized over its own keys) with its log-sum-exp ``s``.
Every LSE here is a **natural log** (FlashInfer's is base 2: multiply those by ln 2 first).
Merging: m = max(s_a, s_b), w = exp(s - m), v = (w_a v_a + w_b v_b) / (w_a + w_b),
s = m + log(w_a + w_b). A state with s = -inf contributes nothing; all -inf gives zeros and -inf.
Computed in fp32 whatever the value dtype. A -inf state's values are never read into the sum
(NaN stored there does not leak); a NaN LSE (or a NaN value of a contributing state) gives NaN in
its row; +inf gives an unspecified result (contents are never inspected on the host).

Every check runs before any launch; a bad argument raises ``tilegraph.errors.InputError`` naming
it (including a tensor on a device kernels cannot run on in this process: a CUDA tensor while
tilegraph runs on the simulator, or a CPU tensor on a GPU process) and nothing is written.
Inputs that are non-contiguous or not 16-byte aligned are copied; outputs and in-place targets
must be contiguous and 16-byte aligned. No op reads tensor contents on the host, so they are
safe to capture in a CUDA graph.
"""

from __future__ import annotations

from typing import Any

import torch

from tilegraph.kernels import primitives as prim
from tilegraph.kernels.merge import launch_pair, launch_states

from ._device import resolve_device
from .errors import DeviceError, InputError

VALUE_DTYPES = {torch.float16: prim.F16, torch.bfloat16: prim.BF16, torch.float32: prim.F32}


def _check_tensor(name: str, t: Any, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise InputError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    try:
        resolve_device(t.device)
    except DeviceError as err:
        raise InputError(f"{name} is on {t.device}, where kernels cannot run in this process: {err}") from None
    return t


def _same_device(named: dict[str, torch.Tensor]) -> None:
    (first_name, first), *rest = named.items()
    for name, t in rest:
        if t.device != first.device:
            raise InputError(f"{name} is on {t.device} but {first_name} is on {first.device}: all tensors must share a device")


def _value_kind(named: dict[str, torch.Tensor]) -> int:
    (first_name, first), *rest = named.items()
    for name, t in named.items():
        if t.dtype not in VALUE_DTYPES:
            raise InputError(f"{name} has dtype {t.dtype}: values must be float16, bfloat16 or float32")
    for name, t in rest:
        if t.dtype != first.dtype:
            raise InputError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}: value dtypes must match")
    return VALUE_DTYPES[first.dtype]


def _check_lse(name: str, s: torch.Tensor, shape: tuple[int, ...], value_name: str) -> None:
    if s.dtype != torch.float32:
        raise InputError(f"{name} has dtype {s.dtype}: LSEs must be float32 (natural log)")
    if tuple(s.shape) != shape:
        raise InputError(f"{name} must have shape {shape} (the leading dims of {value_name}), got {tuple(s.shape)}")


def _check_head_dim(name: str, head_dim: int) -> None:
    if head_dim < 8 or head_dim % 8:
        raise InputError(f"{name} has head_dim {head_dim}: it must be a positive multiple of 8")


def _aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def _input(t: torch.Tensor) -> torch.Tensor:
    """Values: ``t`` itself when contiguous and 16-byte aligned, else an aligned contiguous copy."""
    return t if _aligned(t) else t.clone(memory_format=torch.contiguous_format)


def _lse_input(s: torch.Tensor) -> torch.Tensor:
    """LSEs (read one float at a time): ``s`` itself when contiguous, else a contiguous copy."""
    return s if s.is_contiguous() else s.contiguous()


def _check_target(name: str, t: torch.Tensor, need_aligned: bool) -> None:
    if not t.is_contiguous():
        raise InputError(f"{name} is written in place, so it must be contiguous")
    if need_aligned and t.data_ptr() % 16:
        raise InputError(f"{name} is written in place, so it must be 16-byte aligned (data pointer % 16 == 0)")


def merge_state(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states row by row.

    v_a, v_b: [N, H, D] float16/bfloat16/float32 (same dtype; D a positive multiple of 8);
    s_a, s_b: float32 [N, H], **natural-log** LSEs (FlashInfer's are base 2).
    Returns (v [N, H, D] in the value dtype, s float32 [N, H] natural log).
    A state with LSE -inf contributes nothing; both -inf gives zeros and -inf."""
    v_a, v_b = _check_tensor("v_a", v_a, 3), _check_tensor("v_b", v_b, 3)
    s_a, s_b = _check_tensor("s_a", s_a, 2), _check_tensor("s_b", s_b, 2)
    _same_device({"v_a": v_a, "s_a": s_a, "v_b": v_b, "s_b": s_b})
    kind = _value_kind({"v_a": v_a, "v_b": v_b})
    if v_b.shape != v_a.shape:
        raise InputError(f"v_b has shape {tuple(v_b.shape)} but v_a has {tuple(v_a.shape)}: [N, H, D] must match")
    _check_head_dim("v_a", v_a.shape[2])
    _check_lse("s_a", s_a, tuple(v_a.shape[:2]), "v_a")
    _check_lse("s_b", s_b, tuple(v_a.shape[:2]), "v_a")
    v = torch.empty_like(v_a, memory_format=torch.contiguous_format)
    s = torch.empty(tuple(v_a.shape[:2]), dtype=torch.float32, device=v_a.device)
    launch_pair(kind, _input(v_a), _lse_input(s_a), _input(v_b), _lse_input(s_b), v, s, None)
    return v, s


def merge_state_in_place(
    v: torch.Tensor,
    s: torch.Tensor,
    v_other: torch.Tensor,
    s_other: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> None:
    """Merge (v_other, s_other) into (v, s) in place.

    v, v_other: [N, H, D] float16/bfloat16/float32 (same dtype; D a positive multiple of 8);
    s, s_other: float32 [N, H], **natural-log** LSEs (FlashInfer's are base 2).
    v must be contiguous and 16-byte aligned, s contiguous. mask: optional bool [N]; rows whose
    mask is False keep their v and s untouched (the mask lives on the device, so one captured CUDA
    graph serves any mask). A state with LSE -inf contributes nothing."""
    v, v_other = _check_tensor("v", v, 3), _check_tensor("v_other", v_other, 3)
    s, s_other = _check_tensor("s", s, 2), _check_tensor("s_other", s_other, 2)
    named = {"v": v, "s": s, "v_other": v_other, "s_other": s_other}
    if mask is not None:
        named["mask"] = _check_tensor("mask", mask, 1)
    _same_device(named)
    kind = _value_kind({"v": v, "v_other": v_other})
    if v_other.shape != v.shape:
        raise InputError(f"v_other has shape {tuple(v_other.shape)} but v has {tuple(v.shape)}: [N, H, D] must match")
    _check_head_dim("v", v.shape[2])
    _check_lse("s", s, tuple(v.shape[:2]), "v")
    _check_lse("s_other", s_other, tuple(v.shape[:2]), "v")
    mask_u8 = None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise InputError(f"mask has dtype {mask.dtype}: it must be torch.bool")
        if mask.shape[0] != v.shape[0]:
            raise InputError(f"mask has length {mask.shape[0]} but v has N={v.shape[0]} rows")
        mask_u8 = mask.contiguous().view(torch.uint8)
    _check_target("v", v, need_aligned=True)
    _check_target("s", s, need_aligned=False)
    launch_pair(kind, v, s, _input(v_other), _lse_input(s_other), v, s, mask_u8)


def merge_states(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S states per row.

    v: [N, S, H, D] float16/bfloat16/float32 (D a positive multiple of 8); s: float32 [N, S, H],
    **natural-log** LSEs (FlashInfer's are base 2). Returns (v [N, H, D] in the value dtype,
    s float32 [N, H] natural log). States with LSE -inf contribute nothing; a row with no finite
    state (or S = 0) gives zeros and -inf."""
    v, s = _check_tensor("v", v, 4), _check_tensor("s", s, 3)
    _same_device({"v": v, "s": s})
    kind = _value_kind({"v": v})
    _check_head_dim("v", v.shape[3])
    _check_lse("s", s, tuple(v.shape[:3]), "v")
    n, num_states, heads, head_dim = v.shape
    if num_states == 0:
        out = torch.zeros((n, heads, head_dim), dtype=v.dtype, device=v.device)
        return out, torch.full((n, heads), float("-inf"), dtype=torch.float32, device=v.device)
    out = torch.empty((n, heads, head_dim), dtype=v.dtype, device=v.device)
    out_lse = torch.empty((n, heads), dtype=torch.float32, device=v.device)
    launch_states(kind, _input(v), _lse_input(s), out, out_lse)
    return out, out_lse


__all__ = ["merge_state", "merge_state_in_place", "merge_states"]
