"""vLLM's CommonAttentionMetadata to TilegraphMetadata: host lengths plus vLLM's device block table.

No step copies anything from the device: lengths come from the metadata's CPU fields
(``query_start_loc_cpu``, ``seq_lens_cpu``), the kernels read ``block_table_tensor`` in place.
Uniform single-token decode steps run on BatchDecode with fixed buffers, so vLLM may capture and
replay them as CUDA graphs (``UNIFORM_SINGLE_TOKEN_DECODE``); mixed steps stay eager (BatchPrefill).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata

from tilegraph.errors import InputError

from . import objects
from .metadata import TilegraphMetadata
from .page_table import step_lengths


def host_seq_lens(meta: CommonAttentionMetadata) -> torch.Tensor:
    """The step's KV lengths on the host: vLLM 0.32's ``seq_lens_cpu_upper_bound`` (exact without
    speculative decoding, which the builder refuses), else ``seq_lens`` itself when that is a CPU
    tensor. A device-only seq_lens is refused (no hidden device-to-host copy)."""
    cpu = getattr(meta, "seq_lens_cpu_upper_bound", None)
    if cpu is None and meta.seq_lens.device.type == "cpu":
        cpu = meta.seq_lens
    if cpu is None:
        raise InputError("seq_lens_cpu_upper_bound is missing from the CommonAttentionMetadata: the TILEGRAPH backend "
                         "plans from host lengths and does not copy seq_lens from the device")  # fmt: skip
    return cpu


def max_num_seqs(vllm_config) -> int:
    """vLLM's scheduler bound on requests per step (0 without a config): the decode objects' batch."""
    scheduler = getattr(vllm_config, "scheduler_config", None)
    return int(getattr(scheduler, "max_num_seqs", 0) or 0)


class TilegraphMetadataBuilder(AttentionMetadataBuilder[TilegraphMetadata]):
    """Plans every attention object of its KV cache group at each step, before the layers run (or a
    captured graph replays): the plans read vLLM's device block table in place."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise InputError("speculative_config: speculative decoding is not supported by the TILEGRAPH backend "
                             "(its host seq_lens are an upper bound there, the planner needs exact lengths)")  # fmt: skip
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.group = tuple(layer_names)
        self.max_batch = max_num_seqs(vllm_config)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> TilegraphMetadata:
        meta = common_attn_metadata
        if common_prefix_len:
            raise InputError(f"common_prefix_len={common_prefix_len}: cascade attention is not supported by the TILEGRAPH backend")
        if meta.causal is not True:
            raise InputError("non-causal attention (causal must be True) is not supported by the TILEGRAPH backend")
        table = meta.block_table_tensor
        lengths = step_lengths(meta.query_start_loc_cpu, host_seq_lens(meta), meta.num_reqs, table.shape[1], self.block_size)
        built = TilegraphMetadata(
            num_actual_tokens=int(lengths.qo_indptr[-1]),
            max_query_len=meta.max_query_len,
            lengths=lengths,
            block_table=table,
            slot_mapping=meta.slot_mapping,
            group=self.group,
            max_batch=self.max_batch,
        )
        objects.plan_group(built)
        return built

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> TilegraphMetadata:
        """A capture step: vLLM's uniform decode batch of the capture size (one query token per
        request), planned on BatchDecode like any decode step; refused for any other batch."""
        meta = common_attn_metadata
        built = self.build(0, meta)
        if not built.decode:
            raise InputError(f"build_for_cudagraph_capture: the TILEGRAPH backend captures uniform single-token decode "
                             f"batches only, got num_reqs={meta.num_reqs}, max_query_len={meta.max_query_len}")  # fmt: skip
        return built
