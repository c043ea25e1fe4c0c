"""vLLM's CommonAttentionMetadata to TilegraphMetadata: the step's host page table (one per step)."""

from __future__ import annotations

from vllm.v1.attention.backend import AttentionMetadataBuilder, CommonAttentionMetadata

from tilegraph.errors import InputError

from .metadata import TilegraphMetadata
from .page_table import page_table


class TilegraphMetadataBuilder(AttentionMetadataBuilder[TilegraphMetadata]):
    """Eager only (no CUDA graphs yet): every step is planned on the host."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> TilegraphMetadata:
        meta = common_attn_metadata
        if common_prefix_len:
            raise InputError(f"common_prefix_len={common_prefix_len}: cascade attention is not supported by the TILEGRAPH backend")
        if meta.causal is not True:
            raise InputError("non-causal attention (causal must be True) is not supported by the TILEGRAPH backend")
        table = page_table(meta.query_start_loc_cpu, meta.seq_lens, meta.block_table_tensor, meta.num_reqs, self.block_size)
        return TilegraphMetadata(
            num_actual_tokens=int(table.qo_indptr[-1]),
            max_query_len=meta.max_query_len,
            table=table,
            slot_mapping=meta.slot_mapping,
        )
