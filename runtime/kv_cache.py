"""The paged KV cache as kernels see it: two flat int32 word views and word strides.

Accepted forms (FlashInfer's), each as any strided view whose last dimension is contiguous and
whose data pointer and other strides are 16-byte aligned (a slice of a larger cache works as is):
    one 5-D tensor  NHD [num_pages, 2, page_size, num_kv_heads, head_dim]
                    HND [num_pages, 2, num_kv_heads, page_size, head_dim]      ([:, 0] is K, [:, 1] is V)
    a (k_cache, v_cache) pair of 4-D tensors
                    NHD [num_pages, page_size, num_kv_heads, head_dim]
                    HND [num_pages, num_kv_heads, page_size, head_dim]
The two halves of K and V need the same strides. vLLM's packed per-layer cache
``[num_blocks, block_size, num_kv_heads, 2 * head_dim]`` (K and V split in the last dimension) is
the pair ``(cache[..., :head_dim], cache[..., head_dim:])``. Tensors must be of the Settings dtype,
on the attention object's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from tilegraph.errors import InputError
from tilegraph.settings import Settings

KVCache = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PagedKV:
    """Word views and word strides: element (page, token, head, :) of K starts at word
    ``page * page_stride + token * token_stride + head * head_stride`` of ``k_words`` (same for V)."""

    k_words: torch.Tensor
    v_words: torch.Tensor
    page_stride: int
    token_stride: int
    head_stride: int
    num_pages: int


def _check_tensor(name: str, t: object, settings: Settings, device: torch.device, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != settings.torch_dtype:
        raise InputError(f"{name} has dtype {t.dtype}, Settings.dtype is {settings.dtype}")
    if t.device != device:
        raise InputError(f"{name} is on {t.device}, the attention object runs on {device}")
    if t.dim() != ndim:
        raise InputError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise InputError(f"{name}'s last dimension (head_dim) must be contiguous (stride 1), got strides {t.stride()}")
    item = t.element_size()
    if t.data_ptr() % 16 or any((stride * item) % 16 for stride in t.stride()[:-1]):
        raise InputError(f"{name} must be 16-byte aligned: its data pointer and every stride but the last "
                         f"(in bytes), got strides {t.stride()} of {item}-byte elements")  # fmt: skip
    return t


def strided_words(t: torch.Tensor) -> torch.Tensor:
    """A flat int32 view of the storage ``t`` spans, from its first element to its last (no copy);
    ``t``'s element strides times ``itemsize / 4`` address it in words."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    per_word = 4 // t.element_size()
    span = -(-span // per_word) * per_word
    return torch.as_strided(t, (span,), (1,), t.storage_offset()).view(torch.int32)


def _word_strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(stride * t.element_size() // 4 for stride in t.stride())


def paged_kv(kv_cache: KVCache, settings: Settings, device: torch.device) -> PagedKV:
    """Validate ``kv_cache`` against Settings and describe it for the kernels (no copy)."""
    ps, hkv, hd = settings.page_size, settings.num_kv_heads, settings.head_dim
    nhd = settings.kv_layout == "NHD"
    inner = (ps, hkv, hd) if nhd else (hkv, ps, hd)
    layout = f"{settings.kv_layout} [num_pages, {'page_size, num_kv_heads' if nhd else 'num_kv_heads, page_size'}, head_dim]"
    if isinstance(kv_cache, (tuple, list)):
        if len(kv_cache) != 2:
            raise InputError(f"kv_cache as a sequence must be a (k_cache, v_cache) pair, got {len(kv_cache)} items")
        k = _check_tensor("kv_cache[0] (k_cache)", kv_cache[0], settings, device, 4)
        v = _check_tensor("kv_cache[1] (v_cache)", kv_cache[1], settings, device, 4)
        if tuple(k.shape[1:]) != inner:
            raise InputError(f"k_cache shape {tuple(k.shape)} does not match {layout} = [*, {', '.join(map(str, inner))}]")
        if v.shape != k.shape:
            raise InputError(f"v_cache shape {tuple(v.shape)} differs from k_cache shape {tuple(k.shape)}")
        if v.stride() != k.stride():
            raise InputError(f"v_cache strides {v.stride()} differ from k_cache strides {k.stride()}: the kernels "
                             "address K and V with one set of strides (views of one cache, or both contiguous)")  # fmt: skip
        page, a, b, _ = _word_strides(k)
        token, head = (a, b) if nhd else (b, a)
        return PagedKV(strided_words(k), strided_words(v), page, token, head, k.shape[0])
    cache = _check_tensor("kv_cache", kv_cache, settings, device, 5)
    if cache.shape[1] != 2 or tuple(cache.shape[2:]) != inner:
        raise InputError(
            f"kv_cache shape {tuple(cache.shape)} does not match [num_pages, 2, {', '.join(map(str, inner))}] "
            f"({settings.kv_layout} layout from Settings)"
        )
    page, _, a, b, _ = _word_strides(cache)
    token, head = (a, b) if nhd else (b, a)
    return PagedKV(strided_words(cache[:, 0]), strided_words(cache[:, 1]), page, token, head, cache.shape[0])
