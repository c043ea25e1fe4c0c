"""``tilegraph.Settings``: the model shape and the capacity bounds every workspace is sized from.

Frozen pydantic-settings: every field can come from the environment as ``TILEGRAPH_<FIELD>``
(nested groups, when present, as ``TILEGRAPH_<GROUP>__<FIELD>``). Keyword arguments win over the
environment. Impossible values raise ``pydantic.ValidationError`` naming the field.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DTypeName = Literal["float16", "bfloat16", "float32"]
KVLayout = Literal["NHD", "HND"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


class Settings(BaseSettings):
    """Model shape, KV-cache format and the per-batch capacity bounds.

    Shapes and addresses of every device buffer tilegraph allocates are pure functions of these
    fields and the device, so they never change between steps (what CUDA graphs need).
    """

    model_config = SettingsConfigDict(
        env_prefix="TILEGRAPH_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        validate_default=True,
    )

    # model shape
    num_qo_heads: int = Field(ge=1, le=1024, description="query/output heads")
    num_kv_heads: int = Field(ge=1, le=1024, description="key/value heads; divides num_qo_heads (GQA)")
    head_dim: int = Field(ge=16, le=256, description="a multiple of 16, at most 256")
    # KV cache format
    page_size: int = Field(default=16, ge=1, le=1024, description="tokens per KV page")
    kv_layout: KVLayout = Field(
        default="NHD",
        description="NHD: cache [pages, 2, page_size, kv_heads, head_dim]; HND: [pages, 2, kv_heads, page_size, head_dim]",
    )
    dtype: DTypeName = Field(default="float16", description="q, KV cache and output dtype (a torch.dtype is accepted)")
    sm_scale: float = Field(default=None, gt=0.0, description="logit scale; default 1/sqrt(head_dim)")  # type: ignore[assignment]
    # capacity bounds (per batch)
    max_batch_size: int = Field(default=256, ge=1, le=65536, description="requests per batch")
    max_num_pages: int = Field(default=16384, ge=1, le=2**30, description="pages in the KV pool")
    max_page_refs: int = Field(
        default=None,  # type: ignore[assignment]
        ge=1,
        description="page references (len(kv_indices)) per batch; default max_num_pages",
    )
    num_ctas: int | None = Field(
        default=None, ge=1, le=65536, description="persistent CTA budget; None: SMs x resident CTAs (GPU), 4 (simulator)"
    )
    deterministic: bool = Field(
        default=False, description="split requests independently of the rest of the batch (bitwise-stable outputs)"
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:
        if isinstance(value, torch.dtype):
            for name, dt in TORCH_DTYPES.items():
                if dt == value:
                    return name
            raise ValueError(f"dtype {value} is not supported: use float16, bfloat16 or float32")
        return value

    @field_validator("head_dim")
    @classmethod
    def _head_dim_multiple_of_16(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"head_dim must be a multiple of 16, got {value}")
        return value

    @field_validator("sm_scale", mode="before")
    @classmethod
    def _sm_scale_default(cls, value: Any, info: Any) -> Any:
        if value is None:
            head_dim = info.data.get("head_dim")
            return 1.0 if head_dim is None else 1.0 / math.sqrt(head_dim)  # head_dim error reported
        return value

    @field_validator("max_page_refs", mode="before")
    @classmethod
    def _page_refs_default(cls, value: Any, info: Any) -> Any:
        if value is None:
            return info.data.get("max_num_pages", 1)  # a max_num_pages error is reported
        return value

    @model_validator(mode="after")
    def _combinations(self) -> "Settings":
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(
                f"num_qo_heads ({self.num_qo_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_qo_heads // self.num_kv_heads > 64:
            raise ValueError(f"num_qo_heads / num_kv_heads (the GQA group) is at most 64, got {self.num_qo_heads // self.num_kv_heads}")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def group_size(self) -> int:
        """Query heads per KV head (the GQA group)."""
        return self.num_qo_heads // self.num_kv_heads
