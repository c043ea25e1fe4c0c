"""``tilegraph.Settings``: the model shape and the capacity bounds every workspace is sized from.

Frozen pydantic-settings: every field can come from the environment as ``TILEGRAPH_<FIELD>``
(nested groups, when present, as ``TILEGRAPH_<GROUP>__<FIELD>``). Keyword arguments win over the
environment. Impossible values raise ``pydantic.ValidationError`` naming the field.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DTypeName = Literal["float16", "bfloat16", "float32"]
KVLayout = Literal["NHD", "HND"]
DecodeEngine = Literal["auto", "cuda_cores", "tensor_cores"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


class GraphSettings(BaseModel):
    """CUDA-graph buckets (env ``TILEGRAPH_GRAPHS__BATCH_SIZES='[1,2,4,8]'``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_sizes: tuple[int, ...] | None = Field(
        default=None,
        description="captured batch-size buckets; default [1, 2, 4, 8] + range(16, max_batch_size + 1, 16)",
    )

    @field_validator("batch_sizes")
    @classmethod
    def _sorted_positive(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if not value or min(value) < 1:
            raise ValueError(f"graphs.batch_sizes must be non-empty positive integers, got {list(value)}")
        return tuple(sorted(set(value)))


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
    sm_scale: float = Field(
        default=None, gt=0.0, allow_inf_nan=False, description="logit scale (finite, > 0); default 1/sqrt(head_dim)"
    )  # type: ignore[assignment]
    # capacity bounds (per batch)
    max_batch_size: int = Field(default=256, ge=1, le=65536, description="requests per batch")
    max_num_pages: int = Field(default=16384, ge=1, le=2**30, description="pages in the KV pool")
    max_page_refs: int = Field(
        default=None,  # type: ignore[assignment]
        ge=1,
        le=2**30,
        description="page references (len(kv_indices)) per batch; default max_num_pages",
    )
    max_num_tokens: int = Field(
        default=8192, ge=1, le=2**24, description="query tokens per prefill/append batch (sum of qo lengths)"
    )
    num_ctas: int | None = Field(
        default=None, ge=1, le=65536, description="persistent CTA budget; None: SMs x resident CTAs (GPU), 4 (simulator)"
    )
    max_custom_mask_bits: int = Field(
        default=1 << 16, ge=24, le=1 << 24, description="custom-mask bits per batch (variants.custom_mask: sum of kv lengths)"
    )
    deterministic: bool = Field(
        default=False, description="split requests independently of the rest of the batch (bitwise-stable outputs)"
    )
    decode_engine: DecodeEngine = Field(
        default="auto",
        description="BatchDecode's kernel: 'auto' (the launch tuning table: tensor cores for float16/bfloat16 "
        "GQA groups >= 5, else CUDA cores), 'cuda_cores' or 'tensor_cores' (float16/bfloat16 only)",
    )
    debug_page_table: bool = Field(
        default=False,
        description="after every step with a device page table, read the kernels' page-id guard and raise PageTableError (a host sync)",
    )
    max_cascade_levels: int = Field(
        default=4, ge=1, le=16, description="levels of a CascadeAttention (shared-prefix levels + the request level)"
    )
    max_cascade_groups: int = Field(
        default=None,  # type: ignore[assignment]
        ge=1,
        le=65536,
        description="groups per shared-prefix level of a CascadeAttention; default max_batch_size",
    )

    graphs: GraphSettings = Field(default_factory=GraphSettings, description="CUDA-graph buckets")

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

    @field_validator("max_cascade_groups", mode="before")
    @classmethod
    def _cascade_groups_default(cls, value: Any, info: Any) -> Any:
        if value is None:
            return info.data.get("max_batch_size", 1)  # a max_batch_size error is reported
        return value

    @model_validator(mode="after")
    def _cascade_groups_bound(self) -> "Settings":
        if self.max_cascade_groups > self.max_batch_size:
            raise ValueError(f"max_cascade_groups ({self.max_cascade_groups}) must not exceed max_batch_size ({self.max_batch_size})")
        return self

    @model_validator(mode="after")
    def _combinations(self) -> "Settings":
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(
                f"num_qo_heads ({self.num_qo_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_qo_heads // self.num_kv_heads > 64:
            raise ValueError(f"num_qo_heads / num_kv_heads (the GQA group) is at most 64, got {self.num_qo_heads // self.num_kv_heads}")
        if self.decode_engine == "tensor_cores" and self.dtype == "float32":
            raise ValueError("decode_engine='tensor_cores' needs dtype float16 or bfloat16 (mma has no float32 inputs), got float32")
        buckets = self.graphs.batch_sizes
        if buckets is not None and buckets[-1] > self.max_batch_size:
            raise ValueError(f"graphs.batch_sizes has {buckets[-1]} > max_batch_size ({self.max_batch_size})")
        return self

    @property
    def graph_batch_sizes(self) -> tuple[int, ...]:
        """The buckets graphs are captured for (resolved default)."""
        if self.graphs.batch_sizes is not None:
            return self.graphs.batch_sizes
        default = [1, 2, 4, 8, *range(16, self.max_batch_size + 1, 16)]
        return tuple(b for b in default if b <= self.max_batch_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def group_size(self) -> int:
        """Query heads per KV head (the GQA group)."""
        return self.num_qo_heads // self.num_kv_heads
