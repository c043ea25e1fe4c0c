"""A hooked decode specialization for the GPU compile check (soft-cap logits + a window mask)."""

from __future__ import annotations

import math

from numba import float32

from tilegraph._device import cuda

from .decode import DecodeHooks


@cuda.jit(device=True, inline="always")
def _soft_cap(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
    cap = params[0]
    return float32(cap * math.tanh(score / cap))


@cuda.jit(device=True, inline="always")
def _window(request, qo_pos, kv_pos, qo_head, kv_head, params):
    return qo_pos - kv_pos <= int(params[1])


CHECK_HOOKS = DecodeHooks(logits_transform=_soft_cap, logits_mask=_window, name="softcap+window")
