"""A small Llama-style model whose attention runs through tilegraph (random weights, any size).

    config = LlamaConfig.tiny()                                 # or LlamaConfig() (~1B, bf16)
    settings = config.attention_settings(page_size=16, max_batch_size=64, max_num_pages=4096)
    model = LlamaDecoder(config, device="cuda")
    logits = model.forward({"token_ids": ids, "positions": pos}, paged)   # [B] int32 x2 -> [B, vocab] fp32
    # paged: the PagedAttention the step reads (tilegraph.serving.DecodeRunner builds and refreshes it)

One call is one serving step over n token rows: a decode step (row ``i`` is request ``i``'s next
token, at ``positions[i]``; ``paged.decode`` plans it) or a mixed step of prompt chunks and decode
tokens (``paged.prefill`` plans it: request r's rows are qo_indptr[r]:qo_indptr[r+1]; with
``inputs["last_rows"]`` the logits are those of the rows it lists, each request's last). Per layer: RMSNorm,
one fused QKV matmul, RoPE applied in place on the q and k slices (q, k, v stay strided views of the
QKV output), ``append_kv`` of the new k/v into the paged cache, ``BatchDecode.run``, output
projection (``BatchDecode.run`` or ``BatchPrefill.run``); then RMSNorm and a SwiGLU MLP. Everything the step reads besides ``inputs`` lives in
``PagedAttention`` -- fixed tensors refreshed in place before each step -- so the step can be
captured by ``tilegraph.GraphRunner``. No ``.item()``, no host sync, no shape that depends on data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tilegraph._device import resolve_device
from tilegraph.append import append_kv
from tilegraph.decode import BatchDecode
from tilegraph.errors import InputError
from tilegraph.prefill import BatchPrefill
from tilegraph.settings import TORCH_DTYPES, DTypeName, Settings


@dataclass(frozen=True)
class LlamaConfig:
    """Model shape. The default is Llama-3.2-1B's shape with a 32k vocabulary."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_layers: int = 16
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 64
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 8192  # RoPE table length: every position must be below it
    dtype: DTypeName = "bfloat16"
    seed: int = 0

    @classmethod
    def tiny(cls, **overrides: Any) -> "LlamaConfig":
        """A size the numba CUDA simulator runs in about a second per step."""
        base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_qo_heads=4,
                    num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position=256, dtype="float16")  # fmt: skip
        return cls(**{**base, **overrides})

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def qkv_size(self) -> int:
        return (self.num_qo_heads + 2 * self.num_kv_heads) * self.head_dim

    def attention_settings(self, **capacity: Any) -> Settings:
        """tilegraph Settings of this model's attention; ``capacity``: page_size, max_batch_size, ..."""
        return Settings(num_qo_heads=self.num_qo_heads, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, dtype=self.dtype, **capacity)  # fmt: skip


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [(Hq + 2 Hkv) * head_dim, hidden]: q rows, then k, then v
    wo: torch.Tensor  # [hidden, Hq * head_dim]
    mlp_norm: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate rows, then up
    w_down: torch.Tensor  # [hidden, intermediate]


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]


def random_weights(config: LlamaConfig, device: torch.device) -> LlamaWeights:
    """Normal weights from ``config.seed`` (linear layers scaled 1/sqrt(fan_in): activations stay O(1)),
    norms at 1. Drawn on ``device``: the same seed gives other numbers on a GPU than on a CPU."""
    gen = torch.Generator(device=device).manual_seed(config.seed)
    dtype = config.torch_dtype

    def linear(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen, device=device) * cols**-0.5).to(dtype)

    def norm() -> torch.Tensor:
        return torch.ones(config.hidden_size, dtype=dtype, device=device)

    hidden, inter = config.hidden_size, config.intermediate_size
    layers = [
        LayerWeights(
            attn_norm=norm(),
            wqkv=linear(config.qkv_size, hidden),
            wo=linear(hidden, config.num_qo_heads * config.head_dim),
            mlp_norm=norm(),
            w_gate_up=linear(2 * inter, hidden),
            w_down=linear(hidden, inter),
        )
        for _ in range(config.num_layers)
    ]
    embed = torch.randn(config.vocab_size, hidden, generator=gen, device=device).to(dtype)
    return LlamaWeights(embed, layers, norm(), linear(config.vocab_size, hidden))


def allocate_kv_cache(config: LlamaConfig, settings: Settings, device: torch.device) -> torch.Tensor:
    """Every layer's paged cache in one tensor: ``[num_layers, *layer]``, layer = NHD
    ``[max_num_pages, 2, page_size, num_kv_heads, head_dim]`` (HND: heads before page_size)."""
    check_settings(config, settings)
    ps, hkv, hd = settings.page_size, settings.num_kv_heads, settings.head_dim
    inner = (ps, hkv, hd) if settings.kv_layout == "NHD" else (hkv, ps, hd)
    shape = (config.num_layers, settings.max_num_pages, 2, *inner)
    return torch.zeros(shape, dtype=config.torch_dtype, device=device)


def check_settings(config: LlamaConfig, settings: Settings) -> None:
    mine = (config.num_qo_heads, config.num_kv_heads, config.head_dim, config.dtype)
    theirs = (settings.num_qo_heads, settings.num_kv_heads, settings.head_dim, settings.dtype)
    if mine != theirs:
        raise InputError(f"Settings (num_qo_heads, num_kv_heads, head_dim, dtype) = {theirs} do not match the model's {mine}")


@dataclass
class PagedAttention:
    """What the attention layers read besides a step's inputs. Every tensor keeps its address for
    the life of the object (CUDA graphs replay against them); the serving loop refreshes the int32
    tables in place and plans ``decode`` before each step."""

    decode: BatchDecode | None  # one for all layers: planned once per step (decode steps)
    kv_cache: torch.Tensor  # [num_layers, ...] (allocate_kv_cache)
    batch_indices: torch.Tensor  # [rows] int32: append row -> request of the batch; -1 = padding
    kv_indptr: torch.Tensor  # [max_batch_size + 1] int32 (past the batch: repeats its last value)
    kv_indices: torch.Tensor  # [max_page_refs] int32
    check_values: bool = False  # host-validate append indices (CPU eager only; never under a graph)
    prefill: BatchPrefill | None = None  # instead of decode: mixed steps (prompt chunks + decode tokens)

    @property
    def attention(self) -> BatchDecode | BatchPrefill:
        """The attention object every layer runs this step."""
        attention = self.prefill if self.prefill is not None else self.decode
        if attention is None:
            raise InputError("PagedAttention needs decode= or prefill=")
        return attention


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_tables(config: LlamaConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [max_position, head_dim / 2] (Llama's rotate-half convention)."""
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
    angles = torch.arange(config.max_position, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [n, heads, head_dim] in place (x may be a strided view); cos/sin [n, head_dim / 2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))


class LlamaDecoder:
    """One serving step of a Llama-style model (decode or mixed prefill/decode); holds weights and
    RoPE tables, no per-request state."""

    def __init__(self, config: LlamaConfig, device: str | torch.device | None = None, weights: LlamaWeights | None = None):
        self.config = config
        self.device = resolve_device(device)  # None: the GPU, or the simulator's "cpu"
        self.weights = weights if weights is not None else random_weights(config, self.device)
        self.rope_cos, self.rope_sin = rope_tables(config, self.device)

    def forward(self, inputs: dict[str, torch.Tensor], paged: PagedAttention) -> torch.Tensor:
        """inputs: ``token_ids`` and ``positions``, int32 [n] on the model's device -> logits float32 [n, vocab].

        ``paged.attention`` must hold a plan for these n rows (or n = its padded bucket). With
        ``inputs["last_rows"]`` (int32 [n]) the logits are those of rows ``last_rows`` (row j of the
        result is row last_rows[j]'s): a mixed step keeps each request's last token."""
        cfg, w = self.config, self.weights
        positions = inputs["positions"]
        cos, sin = self._rope(positions)
        h = F.embedding(inputs["token_ids"], w.embed)
        for index, layer in enumerate(w.layers):
            q, k, v = self._qkv(layer, rms_norm(h, layer.attn_norm, cfg.rms_norm_eps), cos, sin)
            out = self._attend(index, q, k, v, positions, paged)
            h = h + F.linear(out.view(out.shape[0], -1), layer.wo)
            h = h + self._mlp(layer, rms_norm(h, layer.mlp_norm, cfg.rms_norm_eps))
        if "last_rows" in inputs:
            h = h.index_select(0, inputs["last_rows"])
        return F.linear(rms_norm(h, w.final_norm, cfg.rms_norm_eps), w.lm_head).float()

    def first_layer_attention(self, inputs: dict[str, torch.Tensor], paged: PagedAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 0 of ``forward`` up to its attention output (for checks): returns (q, out), both
        [n, Hq, head_dim]. Appends this step's k/v to layer 0's cache, as ``forward`` does."""
        layer = self.weights.layers[0]
        cos, sin = self._rope(inputs["positions"])
        x = rms_norm(F.embedding(inputs["token_ids"], self.weights.embed), layer.attn_norm, self.config.rms_norm_eps)
        q, k, v = self._qkv(layer, x, cos, sin)
        return q, self._attend(0, q, k, v, inputs["positions"], paged)

    # ---- pieces ---------------------------------------------------------------------------------

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)

    def _qkv(self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """One QKV matmul; RoPE in place on its q and k columns. q [n, Hq, D], k and v [n, Hkv, D]
        are strided views of the QKV output (row stride (Hq + 2 Hkv) * D)."""
        cfg = self.config
        hq, hkv, d = cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = F.linear(x, layer.wqkv)
        n = qkv.shape[0]
        q_and_k = qkv[:, : (hq + hkv) * d].view(n, hq + hkv, d)
        apply_rope_(q_and_k, cos, sin)
        q = qkv[:, : hq * d].view(n, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
        return q, k, v

    def _attend(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                paged: PagedAttention) -> torch.Tensor:  # fmt: skip
        cache = paged.kv_cache[index]
        attention = paged.attention
        append_kv(k, v, cache, paged.batch_indices[: k.shape[0]], positions, paged.kv_indptr, paged.kv_indices,
                  attention.settings, check_values=paged.check_values)  # fmt: skip
        return attention.run(q, cache)

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, layer.w_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.w_down)
