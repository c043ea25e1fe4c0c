"""The paged KV cache as kernels see it: two flat int32 word views and word strides.

Accepted forms (FlashInfer's):
    one 5-D tensor  NHD [num_pages, 2, page_size, num_kv_heads, head_dim]
                    HND [num_pages, 2, num_kv_heads, page_size, head_dim]      ([:, 0] is K, [:, 1] is V)
    a (k_cache, v_cache) pair of 4-D tensors
                    NHD [num_pages, page_size, num_kv_heads, head_dim]
                    HND [num_pages, num_kv_heads, page_size, head_dim]
Tensors must be contiguous, of the Settings dtype, on the attention object's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from tilegraph.errors import InputError
from tilegraph.kernels.launch import as_words
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
    if not t.is_contiguous():
        raise InputError(f"{name} must be contiguous")
    return t


def paged_kv(kv_cache: KVCache, settings: Settings, device: torch.device) -> PagedKV:
    """Validate ``kv_cache`` against Settings and describe it for the kernels (no copy)."""
    ps, hkv, hd = settings.page_size, settings.num_kv_heads, settings.head_dim
    nhd = settings.kv_layout == "NHD"
    row_words = hd * settings.torch_dtype.itemsize // 4
    token_stride, head_stride = (hkv * row_words, row_words) if nhd else (row_words, ps * row_words)
    page_words = ps * hkv * row_words
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
        return PagedKV(as_words(k), as_words(v), page_words, token_stride, head_stride, k.shape[0])
    cache = _check_tensor("kv_cache", kv_cache, settings, device, 5)
    if cache.shape[1] != 2 or tuple(cache.shape[2:]) != inner:
        raise InputError(
            f"kv_cache shape {tuple(cache.shape)} does not match [num_pages, 2, {', '.join(map(str, inner))}] "
            f"({settings.kv_layout} layout from Settings)"
        )
    words = as_words(cache)
    # K of page p at p * 2 * page_words; V right after it: offset the V view by one page of words
    return PagedKV(words, words[page_words:], 2 * page_words, token_stride, head_stride, cache.shape[0])
