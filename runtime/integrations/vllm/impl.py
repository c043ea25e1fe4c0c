"""The TILEGRAPH attention layer: slot-mapped KV writes and one attention run per layer call (BatchDecode
for uniform single-token decode steps, which vLLM may capture as CUDA graphs; BatchPrefill otherwise)."""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from tilegraph.append import append_kv_slots
from tilegraph.errors import InputError, StateError
from tilegraph.integrations.bounds import Bounds

from . import objects
from .metadata import TilegraphMetadata


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-layer cache, logical [num_blocks, num_kv_heads, block_size, 2 * head_dim], as
    tilegraph's NHD (k, v) pair of strided views [num_blocks, block_size, num_kv_heads, head_dim]."""
    head_dim = kv_cache.shape[-1] // 2
    nhd = kv_cache.permute(0, 2, 1, 3)
    return nhd[..., :head_dim], nhd[..., head_dim:]


class TilegraphImpl(AttentionImpl[TilegraphMetadata]):
    """scale, sliding_window, logits_soft_cap, sinks, alibi_slopes; refuses anything else when made."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        if kv_cache_dtype != "auto":
            raise InputError(f"kv_cache_dtype={kv_cache_dtype!r}: quantized (fp8) KV caches are not supported by the TILEGRAPH backend (only 'auto')")
        if attn_type != AttentionType.DECODER:
            raise InputError(f"attn_type={attn_type!r}: encoder / cross attention is not supported by the TILEGRAPH backend (decoder only)")
        if kv_sharing_target_layer_name is not None:
            raise InputError(f"kv_sharing_target_layer_name={kv_sharing_target_layer_name!r}: cross-layer KV sharing is not supported by the TILEGRAPH backend")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.sliding_window = sliding_window
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        self.sinks = sinks
        self.alibi_slopes = None if alibi_slopes is None else torch.tensor(alibi_slopes, dtype=torch.float32)
        self.features = objects.Features(
            soft_cap=self.logits_soft_cap > 0,
            window=sliding_window is not None,
            sinks=sinks is not None,
            alibi=alibi_slopes is not None,
        )

    def _params(self) -> dict | None:
        params: dict = {}
        if self.features.soft_cap:
            params["logits_soft_cap"] = self.logits_soft_cap
        if self.features.window:
            params["window_left"] = float(self.sliding_window - 1)  # vLLM's window counts the query's own key
        if self.features.sinks:
            params["sinks"] = self.sinks.detach().float()
        if self.features.alibi:
            params["alibi_slopes"] = self.alibi_slopes
        return params or None

    def _held(self, layer, kv_cache: torch.Tensor, meta: TilegraphMetadata, dtype: torch.dtype) -> objects.Held:
        shape = objects.Shape(self.num_heads, self.num_kv_heads, self.head_size, kv_cache.shape[2], self.scale, dtype, kv_cache.device)
        own = id(layer if layer is not None else self) if any(self.features) else 0  # run-time values: its own object
        key = objects.Key(meta.group, shape, self.features, meta.decode, own)
        return objects.held_for(key, objects.need_for(meta, kv_cache.shape[0]))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None) -> torch.Tensor:
        """query [num_tokens, num_heads, head_size] -> output rows of the step's requests (padding rows 0)."""
        if output_scale is not None or output_block_scale is not None:
            raise InputError("fused output quantization (output_scale) is not supported by the TILEGRAPH backend")
        if attn_metadata is None:  # vLLM's profiling / warm-up run
            return output
        meta: TilegraphMetadata = attn_metadata
        rows = meta.num_actual_tokens
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        out[rows:].zero_()
        if rows == 0:
            return output
        held = self._held(layer, kv_cache, meta, query.dtype)
        capturing = kv_cache.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing and held.step != meta.step:
            raise StateError("a CUDA graph capture reached a TILEGRAPH layer whose attention object was not planned by "
                             "the builder (vLLM must run the layer eagerly once before capturing it)")  # fmt: skip
        run_rows = meta.num_reqs if meta.decode else rows  # decode: request r is query row r, padding included
        if query.shape[0] < run_rows:
            raise InputError(f"query has {query.shape[0]} rows, the decode step has {run_rows} requests (one row each)")
        attention = objects.planned(held, meta)
        attention.graph_set_capturing(capturing)
        try:  # under capture the params persist from the eager runs (set_params is a host write)
            attention.run(query[:run_rows], split_cache(kv_cache), params=None if capturing else self._params(), out=out[:run_rows])
        finally:
            attention.graph_set_capturing(False)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """vLLM's reshape_and_cache: rows of key/value to their slots (-1: padding, skipped)."""
        rows = slot_mapping.shape[0]
        settings = objects.settings_for(
            objects.Shape(self.num_heads, self.num_kv_heads, self.head_size, kv_cache.shape[2], self.scale, key.dtype, kv_cache.device),
            Bounds(16, 16, kv_cache.shape[0], 16),
        )
        append_kv_slots(key[:rows], value[:rows], split_cache(kv_cache), slot_mapping.contiguous(), settings)
