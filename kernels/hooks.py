"""The compile-time hook set every attention kernel shares (decode, prefill, partial merge), its
identity defaults, and the numeric constants the kernels agree on.

A variant (tilegraph.variants) is compiled into these hooks; kernels call a hook only where the
variant sets it (``AttentionHooks`` fields left None cost nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from numba import float32

from tilegraph._device import cuda

from . import primitives as prim

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG_INF = float32(-math.inf)
DTYPE_NAMES = {prim.F16: "float16", prim.BF16: "bfloat16", prim.F32: "float32"}


@dataclass(frozen=True)
class AttentionHooks:
    """Compile-time hooks composed into the attention templates (all optional).

    query_transform(q8, dim0, request, qo_head, qo_pos, params)       in place on 8 fp32 values
    key_transform(k8, dim0, request, kv_head, kv_pos, params)         in place on 8 fp32 values
    logits_transform(score, request, qo_pos, kv_pos, qo_head, kv_head, params) -> float32
        (score = q.k * sm_scale, natural units)
    logits_mask(request, qo_pos, kv_pos, qo_head, kv_head, params) -> bool (False: masked out)
    output_transform(o8, dim0, request, qo_head, qo_pos, params)      in place, on the final output
        (after normalization; for a split request, after the partial merge)
    query_pair_transform(q8, partner8, dim0, head_dim, request, qo_head, qo_pos, params)
    key_pair_transform(k8, partner8, dim0, head_dim, request, kv_head, kv_pos, params)
        in place, before the plain transform; partner8 = the 8 raw elements at dims
        (dim0 + head_dim / 2) % head_dim (the rotate-half partner; e.g. RoPE)
    sink(qo_head, params) -> float32 natural logit that joins each softmax denominator once
    softmax: False = no softmax (o = sum_j score_j * v_j, partials summed, LSE meaningless)
    """

    query_transform: Callable[..., Any] | None = None
    key_transform: Callable[..., Any] | None = None
    logits_transform: Callable[..., Any] | None = None
    logits_mask: Callable[..., Any] | None = None
    output_transform: Callable[..., Any] | None = None
    name: str = "default"
    query_pair_transform: Callable[..., Any] | None = None
    key_pair_transform: Callable[..., Any] | None = None
    sink: Callable[..., Any] | None = None
    softmax: bool = True


DEFAULT_HOOKS = AttentionHooks()


# ---- identity hooks: what a kernel calls where the variant sets nothing ----------------------


@cuda.jit(device=True, inline="always")
def identity_vec(vals, dim0, request, head, pos, params):
    return


@cuda.jit(device=True, inline="always")
def identity_logit(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
    return score


@cuda.jit(device=True, inline="always")
def no_mask(request, qo_pos, kv_pos, qo_head, kv_head, params):
    return True


@cuda.jit(device=True, inline="always")
def identity_pair(vals, partner, dim0, head_dim, request, head, pos, params):
    return


@cuda.jit(device=True, inline="always")
def no_sink(qo_head, params):
    return NEG_INF
