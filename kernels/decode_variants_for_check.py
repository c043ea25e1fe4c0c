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


def builtin_variant_cases() -> list[tuple[int, int, int, DecodeHooks]]:
    """(dtype code, head_dim, group, hooks): every built-in variant at least once, under a sample
    Settings for the parameter layout (offsets are compile-time constants)."""
    from tilegraph import variants as V
    from tilegraph.settings import Settings

    from . import primitives as prim

    def hooks(variant, head_dim, group):
        settings = Settings(num_qo_heads=8 * group, num_kv_heads=8, head_dim=head_dim, max_batch_size=64)
        return variant.decode_hooks(settings)

    cases = [
        (prim.F16, 128, 1, V.combine(V.soft_cap(), V.sliding_window(128))),
        (prim.BF16, 128, 8, V.combine(V.alibi(), V.attention_sinks())),
        (prim.F16, 64, 4, V.rope()),
        (prim.F32, 128, 2, V.sigmoid_attention()),
        (prim.BF16, 96, 6, V.custom_mask()),
    ]
    return [(kind, head_dim, group, hooks(v, head_dim, group)) for kind, head_dim, group, v in cases]
