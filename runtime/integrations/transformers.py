"""tilegraph as a Hugging Face transformers attention backend, and a paged KV cache for it.

    from tilegraph.integrations.transformers import TilegraphCache, register
    name = register()                                     # "tilegraph"
    model.set_attn_implementation(name)                   # or from_pretrained(..., attn_implementation=name)
    model.generate(ids, attention_mask=mask)              # default DynamicCache: dense K/V
    model.generate(ids, attention_mask=mask, cache_implementation="static")       # StaticCache
    model.generate(ids, attention_mask=mask, cache=TilegraphCache(model.config))   # paged K/V
    # (cache= is generate's current name for past_key_values=, which still works)

Every attention call of the model runs on tilegraph, as one torch custom op per layer (so
``torch.compile`` traces it without graph breaks): causal prefill (``BatchPrefillRagged``, or
``BatchPrefill`` over the paged cache) and decode (``BatchDecode``), with the module's GQA
(``num_key_value_groups``) and ``scaling``, and the variants the layer asks for: ``softcap`` ->
``variants.soft_cap``, ``sliding_window=w`` -> ``variants.sliding_window(w - 1)`` (transformers keeps
keys j with i - w < j <= i), ``s_aux`` (GPT-OSS) -> ``variants.attention_sinks`` with the layer's
own values; their values are run-time parameters, with one attention object per (variant, layer
kind), so alternating full and windowed layers each keep their plan.

Padding, left or right, and where the queries sit (the end of the KV, or ``cache_position`` in a
static cache) come from the 4-D mask that the registered mask function builds (transformers' own
``sdpa_mask``, always materialized): it is read once per forward and checked to be exactly causal
plus padding (plus the layer's window) over each row's real tokens -- anything else is refused.
Padded query rows get zeros. Dense K/V (dynamic, static, sliding-window caches) are gathered into
ragged rows -- ONE copy of the KV per call; ``TilegraphCache`` keeps them in tilegraph pages and
each call copies only its new tokens in. Plans are cached by what determines them and shared by
every layer of a kind, so each forward plans once per kind.

What it cannot serve raises ``tilegraph.InputError`` before any kernel runs: dropout > 0, attention
weights (``output_attentions``), non-causal attention, position biases, masks other than causal
plus padding (plus a window), query/key and value heads of different sizes, gradients (there is no
backward), and -- with ``TilegraphCache`` -- multi-head latent attention (use the dynamic cache).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError('tilegraph.integrations.transformers needs transformers: pip install "tilegraph[transformers]"') from error

from tilegraph.errors import InputError
from tilegraph.settings import TORCH_DTYPES

from ._hf_cache import LAYER_TAG, LINK, TilegraphCache, TilegraphLayer, registered_names
from ._hf_ops import ATTENTION_OBJECTS, FORWARD_LAYOUTS, dense_attention, paged_attention

SUPPORTED = ((5, 24), (6, 0))  # [from, to): the cache-layer API this module implements
if not SUPPORTED[0] <= tuple(int(part) for part in transformers.__version__.split(".")[:2]) < SUPPORTED[1]:
    raise ImportError(f"tilegraph.integrations.transformers needs transformers >=5.24,<6, found {transformers.__version__}")

__all__ = ["register", "TilegraphCache", "TilegraphLayer", "tilegraph_attention", "tilegraph_mask", "clear_attention_objects"]
_REFUSED_KWARGS = ("position_bias", "cu_seq_lens_q", "cu_seq_lens_k")


def register(name: str = "tilegraph") -> str:
    """Register the tilegraph attention and mask functions under ``name``; returns ``name``."""
    reserved = ("/", "flash", "sdpa", "flex_attention", "paged")
    if not name or name == "eager" or any(part in name for part in reserved):
        raise InputError(f"name={name!r}: transformers treats names with {reserved} or 'eager' specially; choose another")
    AttentionInterface.register(name, tilegraph_attention)
    AttentionMaskInterface.register(name, tilegraph_mask)
    registered_names.add(name)
    return name


def clear_attention_objects() -> None:
    """Release the cached tilegraph attention objects (their workspaces); the next call rebuilds them."""
    ATTENTION_OBJECTS.clear()
    FORWARD_LAYOUTS.clear()


def tilegraph_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' ``sdpa_mask`` (boolean [B, 1, q_len, kv_len]), never skipped for ``is_causal``:
    a skipped mask would leave the causal alignment ambiguous (static caches align it to the start)."""
    _refuse_config(kwargs.get("config"))
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _refuse_config(config: Any) -> None:
    """What the model's config already rules out, before its first attention call."""
    qk, v = getattr(config, "qk_head_dim", None), getattr(config, "v_head_dim", None)
    if isinstance(qk, int) and isinstance(v, int) and qk != v:
        raise InputError(
            f"{type(config).__name__}: qk_head_dim={qk} != v_head_dim={v}: tilegraph's kernels take one head_dim "
            "for q, k and v (this model needs another attn_implementation)"
        )


def tilegraph_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls: query [B, Hq, q_len, D] (RoPE applied), key/value
    [B, H_kv, kv_len, D] (a TilegraphCache: the call's new tokens) -> (output [B, q_len, Hq, D], None)."""
    layer_ref = kwargs.pop(LINK, None)
    if layer_ref is None and not torch.compiler.is_compiling():
        layer_ref = _take_marked_layer(key)
    _refuse_unsupported(module, query, key, value, dropout, kwargs)
    scale = float(scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5))
    window_left = _window_left(kwargs.get("sliding_window"))
    soft_cap = _soft_cap(kwargs.get("softcap"))
    sinks = _sinks(kwargs.get("s_aux"), query.shape[1])
    if layer_ref is None:
        layer_idx = getattr(module, "layer_idx", None)
        layer_idx = layer_idx if isinstance(layer_idx, int) else -1
        return dense_attention(query, key, value, attention_mask, sinks, scale, window_left, soft_cap, layer_idx), None
    if attention_mask is None:
        raise InputError("TilegraphCache needs the 4-D attention mask of register()'s mask function, got attention_mask=None")
    return paged_attention(query, key, value, attention_mask, sinks, layer_ref, scale, window_left, soft_cap), None


def _take_marked_layer(key: torch.Tensor) -> torch.Tensor | None:
    """The layer id a TilegraphCache put on ``key`` (models that call update() without kwargs)."""
    ref = getattr(key, LAYER_TAG, None)
    if ref is not None:
        delattr(key, LAYER_TAG)
    return ref


# ---- checks (all on shapes, dtypes and Python values: nothing here reads a tensor) ----------------


def _refuse_unsupported(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, kwargs: dict[str, Any]
) -> None:
    if dropout:
        raise InputError(f"dropout={dropout}: the tilegraph backend has no attention dropout (call model.eval())")
    if kwargs.get("output_attentions"):
        raise InputError("output_attentions=True: the tilegraph backend never forms attention weights (use attn_implementation='eager')")
    refused = next((name for name in _REFUSED_KWARGS if kwargs.get(name) is not None), None)
    if refused is not None:
        raise InputError(f"{refused}={_describe(kwargs[refused])}: not supported by the tilegraph backend")
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        raise InputError("non-causal attention: the tilegraph backend serves causal (decoder) attention only")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise InputError("gradients: the tilegraph backend has no backward; run under torch.no_grad() or torch.inference_mode()")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise InputError(f"query, key and value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    if query.dtype not in TORCH_DTYPES.values():
        raise InputError(f"dtype {query.dtype}: the tilegraph backend runs float16, bfloat16 and float32")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise InputError(f"query, key and value must be 4-D [B, heads, len, head_dim], got {_describe(query)}, {_describe(key)}, {_describe(value)}")
    num_qo_heads, head_dim = query.shape[1], query.shape[3]
    if key.shape[3] != head_dim or value.shape[3] != head_dim:
        raise InputError(
            f"query/key head_dim {head_dim} (key {_describe(key)}) and value head_dim {value.shape[3]} "
            f"(value {_describe(value)}) differ: tilegraph's kernels take one head_dim for q, k and v "
            "(a model with qk_head_dim != v_head_dim needs another attn_implementation)"
        )
    num_kv_heads = key.shape[1]
    groups = getattr(module, "num_key_value_groups", num_qo_heads // max(num_kv_heads, 1))
    if num_kv_heads * groups != num_qo_heads or value.shape[1] != num_kv_heads:
        raise InputError(
            f"query has {num_qo_heads} heads ({_describe(query)}), key {_describe(key)}, value {_describe(value)}, "
            f"but the module declares num_key_value_groups={groups}"
        )


def _window_left(sliding_window: Any) -> int:
    """transformers' window w keeps keys j with i - w < j <= i: tilegraph's window_left is w - 1."""
    if sliding_window is None:
        return -1
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise InputError(f"sliding_window={_describe(sliding_window)}: expected a positive int (keys per query, itself included)")
    return sliding_window - 1


def _soft_cap(softcap: Any) -> float:
    """The attention logits soft-cap; None or 0: none."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap < 0:
        raise InputError(f"softcap={_describe(softcap)}: expected a non-negative number (0 or None: no soft-cap)")
    return float(softcap)


def _sinks(s_aux: Any, num_qo_heads: int) -> torch.Tensor | None:
    """GPT-OSS's per-head sink logits, [num_qo_heads]."""
    if s_aux is None:
        return None
    if not isinstance(s_aux, torch.Tensor) or s_aux.numel() != num_qo_heads or s_aux.dim() > 1:
        raise InputError(f"s_aux: expected one sink logit per query head, [{num_qo_heads}], got {_describe(s_aux)}")
    if not s_aux.is_floating_point():
        raise InputError(f"s_aux: expected a floating-point tensor, got {_describe(s_aux)}")
    return s_aux.detach()


def _describe(value: Any) -> str:
    """A short description: a tensor's shape and dtype (never its values), or a short repr."""
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={list(value.shape)}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} ({text[:40]}...)"
