"""``tilegraph.Variant``: attention variants as small Python hooks composed into the kernels.

    def decay(score, request, qo_pos, kv_pos, qo_head, kv_head, params, rate):
        return score - params[rate + qo_head] * (qo_pos - kv_pos)

    variant = tilegraph.Variant("distance_decay", logits_transform=decay, params={"rate": "qo_head"})
    dec = tilegraph.BatchDecode(settings, variant=variant, device="cpu")
    dec.plan(...); out = dec.run(q, kv_cache, params={"rate": torch.full((num_qo_heads,), 0.1)})

Hooks (all optional; signatures in ``tilegraph.kernels.decode.DecodeHooks``; scores are
``q.k * sm_scale`` in natural units): ``query_transform``, ``key_transform``, ``logits_transform``,
``logits_mask`` (False: masked out), ``output_transform`` (on the final output), the rotate-half
``query_pair_transform`` / ``key_pair_transform`` (e.g. RoPE) and ``sink`` (a per-head logit that
joins each softmax denominator exactly once). ``softmax=False``: o = sum_j score_j * v_j (the
scores after the logits hook, e.g. a sigmoid); no LSE.

Run-time parameters: declared as ``params={name: shape}`` (or ``Param``s with defaults), shape
"scalar", "qo_head" ([num_qo_heads]), "request" ([<= max_batch_size]), an int, or a function of
Settings. They are packed in declaration order into ONE float32 buffer per attention object, sized
once from Settings (its address never changes: CUDA graphs replay with whatever it holds). A hook
reads parameter ``x`` by taking a trailing argument named ``x``: it receives x's offset in
``params``. Values are given as ``run(..., params={...})`` or ``set_params({...})`` (during a
graph capture: ``set_params`` before capturing/replaying) and persist until changed.

A hook is re-jitted as an ``inline="always"`` device function and checked when the Variant is
made (on a GPU build: compiled for sm_80; on the simulator: run once in a one-thread kernel), so a
wrong signature or a hook numba cannot compile raises ``VariantError`` naming the hook.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from tilegraph.errors import InputError
from tilegraph.kernels import variant_hooks as vh

from .compiling import COMPILE_SECONDS, compile_with_progress  # noqa: F401  (moved; re-exported)
from .settings import Settings
from .variant import DEFAULT, Param, ParamContext, ParamLayout, Variant, VariantError, combine  # noqa: F401

# ---- built-ins ------------------------------------------------------------------------------------


def _finite_non_negative(values: np.ndarray) -> str | None:
    bad = values[~np.isfinite(values) | (values < 0)]
    return f"must be finite and >= 0 (0: no soft-cap), got {bad[0]}" if bad.size else None


def _number(builtin: str, name: str, value: Any) -> float:
    """A built-in's numeric argument as a float (VariantError naming it otherwise)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise VariantError(f"{builtin}: {name} must be a number, got {value!r}") from None


def _numbers(builtin: str, name: str, values: Any) -> np.ndarray:
    try:
        return np.asarray(values, np.float32)
    except (TypeError, ValueError):
        raise VariantError(f"{builtin}: {name} must be a sequence of numbers, got {values!r}") from None


def soft_cap(cap: float = 30.0) -> Variant:
    """Logits soft-capping: score -> cap * tanh(score / cap) (parameter ``logits_soft_cap``); cap 0
    means no soft-cap (FlashInfer's convention); a negative, infinite or NaN cap is refused."""
    try:
        value = float(cap)
    except (TypeError, ValueError):
        raise VariantError(f"soft_cap: cap must be a number, got {cap!r}") from None
    return Variant("soft_cap", logits_transform=vh.soft_cap_logits,
                   params=[Param("logits_soft_cap", "scalar", value, check=_finite_non_negative)])  # fmt: skip


def sliding_window(window_left: int) -> Variant:
    """Attend to kv positions >= qo_pos - window_left (parameter ``window_left``; < 0: no window;
    exact up to 2**24)."""
    return Variant("sliding_window", logits_mask=vh.sliding_window_mask, params=[Param("window_left", "scalar", _number("sliding_window", "window_left", window_left))])


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The standard ALiBi slopes (geometric in 2**(-8/n), interleaved beyond a power of two)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < num_heads:
        extra = 2.0 ** (-4.0 / closest)
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return np.asarray(slopes, np.float32)


def alibi(slopes: Sequence[float] | None = None) -> Variant:
    """ALiBi: score + slope[qo_head] * (kv_pos - qo_pos) (parameter ``alibi_slopes``, per head;
    default: the standard slopes for num_qo_heads)."""
    default = (lambda s: alibi_slopes(s.num_qo_heads)) if slopes is None else _numbers("alibi", "slopes", slopes)
    return Variant("alibi", logits_transform=vh.alibi_logits, params=[Param("alibi_slopes", "qo_head", default)])


def attention_sinks(sinks: Sequence[float] | None = None) -> Variant:
    """A sink logit per query head that joins each softmax denominator once (parameter ``sinks``)."""
    default = None if sinks is None else _numbers("attention_sinks", "sinks", sinks)
    return Variant("sinks", sink=vh.sink_logit, params=[Param("sinks", "qo_head", default)])


def rope(theta: float = 1e4, scale: float = 1.0) -> Variant:
    """Llama-style rotate-half RoPE applied to q (at its query position: kv_len - 1 in decode,
    kv_len - qo_len + i in prefill) and to each k (at its kv position),
    so an unrotated cache can be attended (parameters ``rope_theta``, ``rope_scale``: positions are
    divided by rope_scale)."""
    return Variant(
        "rope",
        query_pair_transform=vh.rope_llama,
        key_pair_transform=vh.rope_llama,
        params=[Param("rope_theta", "scalar", _number("rope", "theta", theta)), Param("rope_scale", "scalar", _number("rope", "scale", scale))],
    )


def sigmoid_attention(bias: float = 0.0) -> Variant:
    """Softmax-free sigmoid attention: o = sum_j sigmoid(score_j + bias) v_j (parameter ``sigmoid_bias``)."""
    return Variant("sigmoid", logits_transform=vh.sigmoid_logits, softmax=False, params=[Param("sigmoid_bias", "scalar", _number("sigmoid_attention", "bias", bias))])


def _mask_words(settings: Settings) -> int:
    return -(-settings.max_custom_mask_bits // vh.MASK_BITS_PER_WORD)


def _encode_custom_mask(values: dict[str, Any], ctx: ParamContext) -> dict[str, Any]:
    """FlashInfer's flattened layout: per request a row-major [qo_len, kv_len] block of bits (decode:
    qo_len 1), concatenated; True = attend. Given as bool, or bit-packed uint8 (each request's
    block packed separately, little bit order, as FlashInfer's segment_packbits)."""
    mask = values["custom_mask"]
    mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    kv_len = ctx.kv_len.astype(np.int64)
    qo_len = np.ones_like(kv_len) if ctx.qo_len is None else ctx.qo_len.astype(np.int64)
    lengths = qo_len * kv_len
    total = int(lengths.sum())
    if mask.dtype == np.uint8:
        rows, start = [], 0
        for n in lengths:
            nbytes = -(-int(n) // 8)
            rows.append(np.unpackbits(mask[start : start + nbytes], bitorder="little")[: int(n)])
            start += nbytes
        if start != mask.size:
            raise InputError(f"custom_mask (packed uint8) has {mask.size} bytes, the plan needs {start}")
        bits = np.concatenate(rows) if rows else np.zeros(0, np.uint8)
    elif mask.dtype == np.bool_:
        bits = mask.reshape(-1).astype(np.uint8)
        if bits.size != total:
            what = "kv lengths" if ctx.qo_len is None else "qo_len x kv_len blocks"
            raise InputError(f"custom_mask has {bits.size} bits, the plan's {what} sum to {total}")
    else:
        raise InputError(f"custom_mask must be bool (flattened) or uint8 (bit-packed), got {mask.dtype}")
    capacity = ctx.settings.max_custom_mask_bits
    if total > capacity:
        raise InputError(f"custom_mask needs {total} bits, Settings.max_custom_mask_bits is {capacity}")
    per = vh.MASK_BITS_PER_WORD
    padded = np.zeros(-(-max(total, 1) // per) * per, np.int64)
    padded[:total] = bits
    words = (padded.reshape(-1, per) << np.arange(per)).sum(axis=1).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.float32) if len(lengths) else np.zeros(0, np.float32)
    # row of query position p: p - (kv_len - qo_len); rows are kv_len bits apart
    return {"mask_offset": offsets, "mask_q0": (kv_len - qo_len).astype(np.float32),
            "mask_stride": kv_len.astype(np.float32), "mask_words": words}  # fmt: skip


def custom_mask() -> Variant:
    """A boolean mask per request (True: attend), given per plan as ``params={"custom_mask": m}``
    (see _encode_custom_mask for the layouts; prefill: a [qo_len, kv_len] block per request). Stored
    in the params buffer: capacity Settings.max_custom_mask_bits. Default until given: attend everywhere."""
    full = float(2**vh.MASK_BITS_PER_WORD - 1)
    return Variant(
        "custom_mask",
        logits_mask=vh.custom_mask_rows,
        params=[Param("mask_offset", "request", 0.0), Param("mask_q0", "request", 0.0),
                Param("mask_stride", "request", 0.0), Param("mask_words", _mask_words, full)],  # fmt: skip
        encode=_encode_custom_mask,
        encode_inputs=("custom_mask",),
    )




__all__ = [
    "Variant",
    "VariantError",
    "Param",
    "ParamLayout",
    "ParamContext",
    "combine",
    "DEFAULT",
    "soft_cap",
    "sliding_window",
    "alibi",
    "alibi_slopes",
    "attention_sinks",
    "rope",
    "sigmoid_attention",
    "custom_mask",
    "COMPILE_SECONDS",
    "compile_with_progress",
]
