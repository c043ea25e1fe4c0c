"""What the driverless GPU compile check compiles: each kernel module lists its specializations.

A kernel module exposes ``gpu_compile_specs() -> list[CompileSpec]`` covering every value of each
specialization axis (dtype, head_dim, layout, variant ...) at least once -- not the full product.
This is the one kernels module that reads the variant definitions (``tilegraph.variants``, imported
inside the functions below): the hooked cases of the covering sets come from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from numba import float32

from tilegraph._device import cuda

from . import primitives as prim
from .hooks import AttentionHooks


@dataclass(frozen=True)
class PerfHints:
    """What the static performance model (tilegraph.tools.perf_model) cannot read from SASS."""

    threads: int                        # threads per CTA on a GPU
    hbm_fraction: float = 1.0           # share of the K/V loop's 16-byte global load bytes that is HBM traffic
    ctas_per_sm: float | None = None    # CTAs the plan launches per SM (decode: num_ctas = 2 x SMs -> 2)
    grid_ctas: int | None = None        # a fixed total grid (the partial merge: 4 CTAs)
    bound: str = "memory"               # "memory" (bandwidth) or "compute" (prefill: FLOP/s)
    family: str = ""                    # budget family (default: the spec name before "[")
    issue_trips: int = 1                # tensor loop: iterations per KV block of its nested cp.async issue loop
    dynamic_shared_bytes: int = 0       # dynamic shared memory of a launch (occupancy counts it with the static)
    score_tiles: int = 1                # tensor loop: S tiles per KV stage, computed by a nested loop


@dataclass(frozen=True)
class CompileSpec:
    name: str                        # e.g. "decode[float16,hd128,NHD]"
    pyfunc: Callable[..., Any]       # the plain Python kernel function (before cuda.jit)
    signature: str                   # numba signature, e.g. "void(int32[::1], float32[::1], int32)"
    expect: tuple[str, ...] = field(default=())  # PTX substrings that must appear (e.g. "ld.global.nc.v4")
    fastmath: bool = False           # the kernel's own cuda.jit fastmath option
    perf: PerfHints | None = None    # inputs of the performance model (None: SASS structure only)


# ---- hooked specializations for the covering sets ----------------------------------------------


@cuda.jit(device=True, inline="always")
def _check_soft_cap(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
    cap = params[0]
    return float32(cap * math.tanh(score / cap))


@cuda.jit(device=True, inline="always")
def _check_window(request, qo_pos, kv_pos, qo_head, kv_head, params):
    return qo_pos - kv_pos <= int(params[1])


@cuda.jit(device=True, inline="always")
def _check_scale_out(o8, dim0, request, qo_head, qo_pos, params):
    for k in range(8):
        o8[k] *= params[2]


#: decode: soft-capped logits + a window mask
DECODE_CHECK_HOOKS = AttentionHooks(logits_transform=_check_soft_cap, logits_mask=_check_window, name="softcap+window")
#: prefill: every hook position the kernel has but the key/query ones
PREFILL_CHECK_HOOKS = AttentionHooks(logits_transform=_check_soft_cap, logits_mask=_check_window,
                                     output_transform=_check_scale_out, name="softcap+window+scale")  # fmt: skip


def _variant_hooks(variant: Any, head_dim: int, group: int) -> AttentionHooks:
    """A built-in variant's hooks under a sample Settings (param offsets are compile-time constants)."""
    from tilegraph.settings import Settings

    settings = Settings(num_qo_heads=8 * group, num_kv_heads=8, head_dim=head_dim, max_batch_size=64)
    return variant.decode_hooks(settings)


def decode_variant_cases() -> list[tuple[int, int, int, AttentionHooks]]:
    """(dtype code, head_dim, group, hooks): every built-in variant at least once."""
    from tilegraph import variants as V

    cases = [
        (prim.F16, 128, 1, V.combine(V.soft_cap(), V.sliding_window(128))),
        (prim.BF16, 128, 8, V.combine(V.alibi(), V.attention_sinks())),
        (prim.F16, 64, 4, V.rope()),
        (prim.F32, 128, 2, V.sigmoid_attention()),
        (prim.BF16, 96, 6, V.custom_mask()),
    ]
    return [(kind, hd, group, _variant_hooks(v, hd, group)) for kind, hd, group, v in cases]


def prefill_variant_cases() -> list[tuple[int, int, int, bool, bool, AttentionHooks]]:
    """(dtype code, head_dim, group, paged, causal, hooks): every built-in variant at least once."""
    from tilegraph import variants as V

    cases = [
        (prim.F16, 128, 1, True, True, V.combine(V.soft_cap(), V.sliding_window(128))),
        (prim.BF16, 128, 8, True, True, V.combine(V.alibi(), V.attention_sinks())),
        (prim.F16, 64, 4, False, True, V.rope()),
        (prim.F32, 128, 2, True, False, V.sigmoid_attention()),
        (prim.BF16, 96, 6, True, True, V.custom_mask()),
    ]
    return [(kind, hd, group, paged, causal, _variant_hooks(v, hd, group)) for kind, hd, group, paged, causal, v in cases]
