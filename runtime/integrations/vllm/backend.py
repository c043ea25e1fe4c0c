"""The TILEGRAPH vLLM v1 attention backend: what it supports, and its builder and layer classes."""

from __future__ import annotations

from typing import ClassVar

import torch
import vllm
from vllm.v1.attention.backend import AttentionBackend, AttentionType, MultipleOf
from vllm.v1.kv_cache_layout import KVCacheLayout

from .builder import TilegraphMetadataBuilder
from .impl import TilegraphImpl
from .version import check_vllm_version

check_vllm_version(vllm.__version__)


class TilegraphBackend(AttentionBackend):
    """Decoder self-attention over vLLM's packed paged cache and device block table; uniform
    single-token decode steps may run as CUDA graphs (the builder's UNIFORM_SINGLE_TOKEN_DECODE)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "TILEGRAPH"

    @staticmethod
    def get_impl_cls() -> type[TilegraphImpl]:
        return TilegraphImpl

    @staticmethod
    def get_builder_cls() -> type[TilegraphMetadataBuilder]:
        return TilegraphMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(range(16, 257, 16))

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER
