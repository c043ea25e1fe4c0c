"""tilegraph as a Hugging Face transformers attention backend, and a paged KV cache for it.

    from tilegraph.integrations.transformers import TilegraphCache, register
    name = register()                                     # "tilegraph"
    model.set_attn_implementation(name)                   # or from_pretrained(..., attn_implementation=name)
    model.generate(ids, attention_mask=mask)              # default DynamicCache: dense K/V
    model.generate(ids, attention_mask=mask, cache=TilegraphCache(model.config))   # paged K/V
    # (cache= is generate's current name for past_key_values=, which still works)

Every attention call of the model runs on tilegraph: causal prefill (``BatchPrefillRagged``, or
``BatchPrefill`` over the paged cache) and decode (``BatchDecode``), with the module's GQA
(``num_key_value_groups``) and ``scaling``. Padding, left or right, comes from the 4-D mask that
the registered mask function builds (transformers' own ``sdpa_mask``, always materialized): each
row's real KV positions and real queries are read from it once per forward, and anything other
than causal-plus-padding is refused. Padded query rows get zeros.

With transformers' default ``DynamicCache`` the keys/values arrive dense ``[B, H_kv, kv_len, D]``:
each call gathers the real positions into ragged ``[nnz_kv, H_kv, D]`` rows -- ONE copy of the KV
per call (per layer). Decode calls view those rows as one-token pages for ``BatchDecode``.
``TilegraphCache`` instead keeps the KV in tilegraph pages (``PagePool`` + ``append_kv``, padding
never stored): each call copies only its new tokens in, and decode reads the pages in place.

Plans are cached by what determines them (lengths, padding, the cache step) and shared by every
layer, so each forward plans once. Reading the mask costs one device-to-host copy per forward.
What it cannot serve raises ``tilegraph.InputError``: dropout > 0, attention weights
(``output_attentions``), non-causal attention, soft-capping, sliding windows, sinks, position
biases, masks other than causal plus padding, and gradients (there is no backward).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError('tilegraph.integrations.transformers needs transformers: pip install "tilegraph[transformers]"') from error

from tilegraph.append import append_kv
from tilegraph.errors import InputError, StateError
from tilegraph.page_pool import PagePool
from tilegraph.settings import TORCH_DTYPES, Settings

from ._hf_batch import AttentionObjects, BatchLayout, Bounds, Shape, batch_layout

SUPPORTED = ((5, 24), (6, 0))  # [from, to): the cache-layer API this module implements
if not SUPPORTED[0] <= tuple(int(part) for part in transformers.__version__.split(".")[:2]) < SUPPORTED[1]:
    raise ImportError(f"tilegraph.integrations.transformers needs transformers >=5.24,<6, found {transformers.__version__}")

ATTENTION_OBJECTS = AttentionObjects()  # shared by every model that uses the backend
_registered: set[str] = set()
_step_serials = itertools.count(1)
_REFUSED_KWARGS = ("softcap", "sliding_window", "s_aux", "position_bias", "cu_seq_lens_q", "cu_seq_lens_k")


def register(name: str = "tilegraph") -> str:
    """Register the tilegraph attention and mask functions under ``name``; returns ``name``."""
    reserved = ("/", "flash", "sdpa", "flex_attention", "paged")
    if not name or name == "eager" or any(part in name for part in reserved):
        raise InputError(f"name={name!r}: transformers treats names with {reserved} or 'eager' specially; choose another")
    AttentionInterface.register(name, tilegraph_attention)
    AttentionMaskInterface.register(name, tilegraph_mask)
    _registered.add(name)
    return name


def clear_attention_objects() -> None:
    """Release the cached tilegraph attention objects (their workspaces); the next call rebuilds them."""
    ATTENTION_OBJECTS.clear()


def tilegraph_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' ``sdpa_mask`` (boolean [B, 1, q_len, kv_len]), never skipped for ``is_causal``:
    a skipped mask would leave the causal alignment ambiguous (static caches align it to the start)."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


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
    [B, H_kv, kv_len, D] -> (output [B, q_len, Hq, D], None)."""
    layer = _take_paged_layer(key)
    _refuse_unsupported(module, query, key, value, dropout, kwargs)
    shape = _shape(module, query, key, scaling)
    batch_size, _, q_len, _ = query.shape
    kv_len = key.shape[2] if layer is None else layer.seen
    layout = batch_layout(attention_mask, batch_size, q_len, kv_len, query.device)
    if layer is None:
        return _dense_attention(query, key, value, layout, shape), None
    return _paged_attention(query, key, value, layout, shape, layer), None


# ---- checks ------------------------------------------------------------------------------------


def _refuse_unsupported(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, kwargs: dict[str, Any]
) -> None:
    if dropout:
        raise InputError(f"dropout={dropout}: the tilegraph backend has no attention dropout (call model.eval())")
    if kwargs.get("output_attentions"):
        raise InputError("output_attentions=True: the tilegraph backend never forms attention weights (use attn_implementation='eager')")
    refused = [name for name in _REFUSED_KWARGS if kwargs.get(name) is not None]
    if refused:
        raise InputError(f"{refused[0]}={kwargs[refused[0]]!r}: not supported by the tilegraph backend")
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        raise InputError("non-causal attention: the tilegraph backend serves causal (decoder) attention only")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise InputError("gradients: the tilegraph backend has no backward; run under torch.no_grad() or torch.inference_mode()")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise InputError(f"query, key and value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    if query.dtype not in TORCH_DTYPES.values():
        raise InputError(f"dtype {query.dtype}: the tilegraph backend runs float16, bfloat16 and float32")


def _shape(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> Shape:
    num_qo_heads, head_dim = query.shape[1], query.shape[3]
    num_kv_heads = key.shape[1]
    groups = getattr(module, "num_key_value_groups", num_qo_heads // max(num_kv_heads, 1))
    if num_kv_heads * groups != num_qo_heads or key.shape[3] != head_dim:
        raise InputError(
            f"query has {num_qo_heads} heads of {head_dim}, key {num_kv_heads} heads of {key.shape[3]}, "
            f"but the module declares num_key_value_groups={groups}"
        )
    scale = scaling if scaling is not None else getattr(module, "scaling", head_dim**-0.5)
    return Shape(num_qo_heads, num_kv_heads, head_dim, 1, float(scale), query.dtype, query.device)


# ---- dense K/V (DynamicCache, StaticCache, no cache) ----------------------------------------------


def _dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BatchLayout, shape: Shape) -> torch.Tensor:
    """Gather the real KV positions (the one copy), then ragged prefill or one-token-page decode."""
    batch_size, num_qo_heads, q_len, head_dim = query.shape
    out = query.new_zeros(batch_size, q_len, num_qo_heads, head_dim)
    if layout.num_kv == 0:
        return out
    k = key.transpose(1, 2)[layout.kv_rows, layout.kv_cols]  # [nnz_kv, H_kv, D], contiguous
    v = value.transpose(1, 2)[layout.kv_rows, layout.kv_cols]
    plan_key = ("dense", layout.key)
    if q_len == 1:
        need = Bounds(batch_size, batch_size, layout.num_kv, layout.num_kv)
        held = ATTENTION_OBJECTS.get("decode", shape, need)
        pages = np.arange(layout.num_kv, dtype=np.int32)
        last = np.ones(batch_size, dtype=np.int32)
        decode = ATTENTION_OBJECTS.plan(held, plan_key, lambda obj: obj.plan(layout.kv_indptr, pages, last))
        one_token_pages = (k.unsqueeze(1), v.unsqueeze(1))  # NHD pages of one token: [nnz_kv, 1, H_kv, D]
        return decode.run(query[:, :, 0, :], one_token_pages).unsqueeze(1)
    held = ATTENTION_OBJECTS.get("ragged", shape, Bounds(batch_size, max(layout.num_queries, 1), 1, 1))
    ragged = ATTENTION_OBJECTS.plan(held, plan_key, lambda obj: obj.plan(layout.qo_indptr, layout.kv_indptr))
    q = query.transpose(1, 2)[layout.q_rows, layout.q_cols]
    out[layout.q_rows, layout.q_cols] = ragged.run(q, k, v)
    return out


# ---- paged K/V (TilegraphCache) -----------------------------------------------------------------


def _paged_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BatchLayout, shape: Shape, layer: "TilegraphLayer"
) -> torch.Tensor:
    """Append the call's real tokens to the layer's pages, then paged prefill or decode in place."""
    cache = layer.cache
    step = cache.step_for_layer(layer, layout)
    pages = layer.kv_pages
    assert pages is not None and cache.settings is not None
    if layout.num_queries:
        k_new = key.transpose(1, 2)[layout.q_rows, layout.q_cols]  # the new tokens only
        v_new = value.transpose(1, 2)[layout.q_rows, layout.q_cols]
        append_kv(k_new, v_new, pages, step.batch_indices, step.positions, step.kv_indptr, step.kv_indices, cache.settings)
    batch_size, num_qo_heads, q_len, head_dim = query.shape
    shape = shape._replace(page_size=cache.page_size)
    refs = max(len(step.table.kv_indices), 1)
    table = step.table
    if q_len == 1:
        held = ATTENTION_OBJECTS.get("decode", shape, Bounds(batch_size, batch_size, cache.max_num_pages, refs))
        decode = ATTENTION_OBJECTS.plan(held, step.key, lambda obj: obj.plan(*table))
        return decode.run(query[:, :, 0, :], pages).unsqueeze(1)
    out = query.new_zeros(batch_size, q_len, num_qo_heads, head_dim)
    need = Bounds(batch_size, max(layout.num_queries, 1), cache.max_num_pages, refs)
    held = ATTENTION_OBJECTS.get("paged", shape, need)
    prefill = ATTENTION_OBJECTS.plan(held, step.key, lambda obj: obj.plan(layout.qo_indptr, *table))
    q = query.transpose(1, 2)[layout.q_rows, layout.q_cols]
    out[layout.q_rows, layout.q_cols] = prefill.run(q, pages)
    return out


def _take_paged_layer(key: torch.Tensor) -> "TilegraphLayer | None":
    """The TilegraphCache layer whose update() returned ``key`` (it marks the tensor), if any."""
    layer = getattr(key, "_tilegraph_layer", None)
    if layer is not None:
        del key._tilegraph_layer
        layer.pending = False
    return layer


@dataclass(frozen=True)
class _Step:
    """One forward's page bookkeeping, shared by every layer: where the new tokens go, the page table."""

    key: tuple[Any, ...]
    layout_key: tuple[Any, ...]
    batch_indices: torch.Tensor  # int32 [nnz_new] on the device
    positions: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    table: Any  # tilegraph.PageTable (numpy) for the planners


class TilegraphLayer(CacheLayerMixin):
    """One layer's K/V pages: NHD ``[max_num_pages, 2, page_size, H_kv, D]``, allocated on first use.

    ``update`` stores nothing itself: it marks the new key states so the attention call (which knows
    the padding) appends the real tokens. ``seen`` counts positions as transformers does (padding too)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "TilegraphCache", layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.kv_pages: torch.Tensor | None = None
        self.seen = 0
        self.steps = 0  # forwards whose tokens this layer has appended
        self.pending = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        cache = self.cache
        _, num_kv_heads, _, head_dim = key_states.shape
        shape = (cache.max_num_pages, 2, cache.page_size, num_kv_heads, head_dim)
        self.kv_pages = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.keys, self.values = self.kv_pages[:, 0], self.kv_pages[:, 1]
        self.device = key_states.device
        self.is_initialized = True
        cache.ensure_pool(num_kv_heads, head_dim, key_states.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending:
            raise StateError(
                f"TilegraphCache layer {self.layer_idx} was updated twice without an attention call in between: "
                "the model must run with the attn_implementation returned by register()"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.pending = True
        key_states._tilegraph_layer = self
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen, self.steps, self.pending = 0, 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise InputError("TilegraphCache does not reorder rows (beam search): use num_beams=1")

    def crop(self, tokens_to_remove: int) -> None:
        raise InputError("TilegraphCache cannot crop (assisted decoding): use the default cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise InputError("TilegraphCache cannot repeat rows (num_return_sequences > 1, beams): use the default cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise InputError("TilegraphCache cannot select rows: use the default cache")


class TilegraphCache(Cache):
    """A transformers cache whose K/V live in tilegraph pages: one ``PagePool`` for the batch's rows
    (shared by the layers), one page tensor per layer. Padding is never stored. Serves one batch:
    start a new cache for the next ``generate()``.

    ``max_num_pages`` x ``page_size`` tokens fit (all rows together); a step beyond raises
    ``tilegraph.PoolExhaustedError`` before writing anything."""

    def __init__(self, config: Any, max_num_pages: int = 1024, page_size: int = 16) -> None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        implementation = getattr(text_config, "_attn_implementation", None)
        if implementation not in _registered:
            raise InputError(
                f"TilegraphCache needs a model running the tilegraph attention (attn_implementation in "
                f"{sorted(_registered)}), but its config says {implementation!r}: call register() and set it first"
            )
        self.max_num_pages = int(max_num_pages)
        self.page_size = int(page_size)
        self.num_qo_heads = int(text_config.num_attention_heads)
        self.settings: Settings | None = None
        self.pool: Any = None
        self._steps = 0
        self._step: _Step | None = None
        layers = [TilegraphLayer(self, i) for i in range(text_config.num_hidden_layers)]
        super().__init__(layers=layers)

    def ensure_pool(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Settings and PagePool for append_kv, made when the first layer sees its first keys."""
        if self.settings is not None:
            if (self.settings.num_kv_heads, self.settings.head_dim, self.settings.torch_dtype) != (num_kv_heads, head_dim, dtype):
                raise InputError("TilegraphCache layers disagree on K/V heads, head_dim or dtype")
            return
        self.settings = Settings(
            num_qo_heads=self.num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=self.page_size,
            kv_layout="NHD", dtype=dtype, max_num_pages=self.max_num_pages,
        )  # fmt: skip
        self.pool = PagePool(self.settings)

    def step_for_layer(self, layer: TilegraphLayer, layout: BatchLayout) -> _Step:
        """The forward's step: allocated by the first layer to get here, reused by the others."""
        if layer.steps == self._steps:
            self._step = self._allocate(layout)
            self._steps += 1
        elif layer.steps != self._steps - 1 or self._step is None or self._step.layout_key != layout.key:
            raise StateError(
                f"TilegraphCache layer {layer.layer_idx} is out of step with the others "
                "(every layer must see the same batch each forward)"
            )
        layer.steps += 1
        return self._step

    def _allocate(self, layout: BatchLayout) -> _Step:
        pool = self.pool
        rows = list(range(layout.batch_size))
        held = pool.request_ids
        if held and held != rows:
            raise InputError(f"the batch changed from {len(held)} to {layout.batch_size} rows: a TilegraphCache serves one batch")
        for row in rows:
            stored = pool.kv_len(row) if row in pool else 0
            if stored != layout.past_counts[row]:
                raise InputError(
                    f"row {row}: the mask marks {layout.past_counts[row]} earlier positions real but the cache "
                    f"holds {stored} tokens (earlier padding must stay padding, and real tokens real)"
                )
        append = pool.allocate_step(rows, [int(n) for n in layout.new_counts])
        table = pool.page_table(rows)
        device = self.layers[0].device

        def on_device(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int32)).to(device)

        return _Step(
            key=("paged", next(_step_serials)),
            layout_key=layout.key,
            batch_indices=on_device(append.batch_indices),
            positions=on_device(append.positions),
            kv_indptr=on_device(table.kv_indptr),
            kv_indices=on_device(table.kv_indices),
            table=table,
        )

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        if self.pool is not None:
            for row in self.pool.request_ids:
                self.pool.free(row)
        self._steps, self._step = 0, None
