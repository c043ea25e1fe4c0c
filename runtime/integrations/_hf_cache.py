"""``TilegraphCache``: a transformers cache whose K/V live in tilegraph pages (``PagePool`` + ``append_kv``).

``update`` stores nothing: it hands the attention call a one-element CPU tensor naming the layer
(in the call's kwargs, or -- for the few models that do not pass kwargs to ``update`` -- on the key
tensor, eagerly), and the attention call, which knows the padding, appends the real tokens. All
bookkeeping happens inside that call (a custom op), so a compiled forward never sees it.

Two ways to size the mask: by default as transformers' dynamic cache does (``seen + q_len``
positions, growing each step); with ``max_cache_len`` as its static cache does (a fixed window,
queries at ``cache_position``, the length a tensor), which is what ``torch.compile(fullgraph=True)``
needs: no shape and no Python number changes between decode steps.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tilegraph.errors import InputError, StateError
from tilegraph.page_pool import PagePool
from tilegraph.settings import Settings

from ._hf_batch import BatchLayout, MaskView, batch_layout, read_mask

LAYERS: dict[int, "weakref.ReferenceType[TilegraphLayer]"] = {}  # layer id -> layer, for the custom op
_layer_ids = itertools.count(1)
_step_serials = itertools.count(1)
LINK = "tilegraph_layer"  # the attention kwarg update() adds: the layer's id tensor
registered_names: set[str] = set()  # attn_implementation names register() has set up

#: the attribute a TilegraphCache tags a layer's new keys with (read by the attention function)
LAYER_TAG = "tilegraph_layer"


def layer_for(ref: torch.Tensor) -> "TilegraphLayer":
    layer = LAYERS.get(int(ref.reshape(-1)[0]))
    target = layer() if layer is not None else None
    if target is None:
        raise StateError("the TilegraphCache layer of this attention call no longer exists")
    return target


def text_config_of(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_head_shape(config: Any) -> tuple[int, int]:
    """(num_kv_heads, head_dim) the model's attention layers use, from its config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, int(head_dim)


def refuse_unpageable(config: Any) -> None:
    """InputError for configs whose cached K/V are not what attention reads (MLA), or whose query/key
    and value heads differ in size."""
    if getattr(config, "kv_lora_rank", None):
        raise InputError(
            f"TilegraphCache: {type(config).__name__} uses multi-head latent attention (kv_lora_rank="
            f"{config.kv_lora_rank}): its cache holds the compressed latent, expanded into K/V after the cache "
            "update, so pages of K/V cannot be filled from it. Use the default dynamic cache (generate() "
            "without cache=), which the tilegraph backend serves"
        )
    qk, v = getattr(config, "qk_head_dim", None), getattr(config, "v_head_dim", None)
    if qk is not None and v is not None and qk != v:
        raise InputError(f"TilegraphCache: qk_head_dim={qk} != v_head_dim={v}; tilegraph pages hold K and V of one head_dim")


@dataclass
class Step:
    """One forward's page bookkeeping, shared by every layer: where the new tokens go, the page table,
    and each mask's validated layout (against the tokens stored before this step)."""

    key: tuple[Any, ...]
    view: MaskView
    stored: np.ndarray  # bool [B, kv_len]: positions held before this step
    batch_indices: torch.Tensor  # int32 [nnz_new] on the device
    positions: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    table: Any  # tilegraph.PageTable (numpy) for the planners
    layouts: dict[tuple[int, int], tuple[Any, BatchLayout]] = field(default_factory=dict)

    def layout(self, mask: torch.Tensor, window_left: int, device: torch.device) -> BatchLayout:
        slot = (id(mask), window_left)
        held = self.layouts.get(slot)
        if held is not None and held[0]() is mask:
            return held[1]
        batch_size, q_len, kv_len = self.view.shape
        view = read_mask(mask, batch_size, q_len, kv_len)
        if view.offset != self.view.offset or not np.array_equal(view.real_q, self.view.real_q):
            raise InputError("the layers' attention masks disagree on which queries are real or where they sit")
        layout = batch_layout(view, window_left, device, stored=self.stored)
        self.layouts[slot] = (weakref.ref(mask), layout)
        return layout


class TilegraphLayer(CacheLayerMixin):
    """One layer's K/V pages: NHD ``[max_num_pages, 2, page_size, H_kv, D]``."""

    is_sliding = False
    is_croppable = False

    def __init__(self, cache: "TilegraphCache", layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.kv_pages: torch.Tensor | None = None
        self.seen = 0  # positions so far, padding too (dynamic mask sizes)
        self.cumulative_length = torch.zeros((), dtype=torch.long)  # the same as a tensor (static mask sizes)
        self.steps = 0  # forwards whose tokens this layer has appended
        self.pending = False
        self.layer_id = next(_layer_ids)
        self.ref = torch.tensor([self.layer_id], dtype=torch.long)  # what update() hands the attention call
        LAYERS[self.layer_id] = weakref.ref(self, lambda _, layer_id=self.layer_id: LAYERS.pop(layer_id, None))

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return self.cache.max_cache_len is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        cache = self.cache
        _, num_kv_heads, _, head_dim = key_states.shape
        shape = (cache.max_num_pages, 2, cache.page_size, num_kv_heads, head_dim)
        self.kv_pages = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.keys, self.values = self.kv_pages[:, 0], self.kv_pages[:, 1]
        self.device = key_states.device
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.is_initialized = True
        cache.ensure_pool(num_kv_heads, head_dim, key_states.dtype, key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        compiling = torch.compiler.is_compiling()
        if not self.is_initialized:
            if compiling:
                raise InputError("TilegraphCache under torch.compile: pass dtype= and device= to TilegraphCache so its pages exist before compiling")
            self.lazy_initialization(key_states, value_states)
        if self.pending and not compiling:
            raise StateError(
                f"TilegraphCache layer {self.layer_idx} was updated twice without an attention call in between: "
                "the model must run with the attn_implementation returned by register()"
            )
        if self.cache.max_cache_len is None:
            self.seen += key_states.shape[-2]
        else:
            self.cumulative_length.add_(key_states.shape[-2])
        attention_kwargs = kwargs.get("kwargs")
        if isinstance(attention_kwargs, dict):
            attention_kwargs[LINK] = self.ref
        elif compiling:
            raise InputError(
                "TilegraphCache under torch.compile: this model calls cache.update() without its attention kwargs, "
                "so the compiled attention cannot find the pages; compile it with the static cache instead"
            )
        else:
            setattr(key_states, LAYER_TAG, self.ref)
        if not compiling:
            self.pending = True
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.cache.max_cache_len is not None:
            return self.cache.max_cache_len, 0
        return self.seen + query_length, 0

    def get_seq_length(self) -> Any:
        return self.seen if self.cache.max_cache_len is None else self.cumulative_length

    def get_max_length(self) -> int:
        return -1 if self.cache.max_cache_len is None else self.cache.max_cache_len

    def reset(self) -> None:
        self.seen, self.steps, self.pending = 0, 0, False
        self.cumulative_length.zero_()

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
    (shared by the layers), one page tensor per layer. Padding is never stored; windowed layers keep
    their full history and the sliding-window variant masks it. Serves one batch: start a new cache
    for the next ``generate()``.

    ``max_num_pages`` x ``page_size`` tokens fit (all rows together); a step beyond raises
    ``tilegraph.PoolExhaustedError`` before writing anything. ``max_cache_len``: size the mask like
    transformers' static cache (positions per row, prompt plus generated tokens), for
    ``torch.compile``; ``dtype`` and ``device``: allocate the pages now (needed before compiling)."""

    def __init__(
        self,
        config: Any,
        max_num_pages: int = 1024,
        page_size: int = 16,
        max_cache_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        text_config = text_config_of(config)
        implementation = getattr(text_config, "_attn_implementation", None)
        if implementation not in registered_names:
            raise InputError(
                f"TilegraphCache needs a model running the tilegraph attention (attn_implementation in "
                f"{sorted(registered_names)}), but its config says {implementation!r}: call register() and set it first"
            )
        refuse_unpageable(text_config)
        if (dtype is None) != (device is None):
            raise InputError(f"TilegraphCache: pass both dtype and device to allocate the pages now (got dtype={dtype}, device={device})")
        self.max_num_pages = int(max_num_pages)
        self.page_size = int(page_size)
        self.max_cache_len = None if max_cache_len is None else int(max_cache_len)
        self.num_qo_heads = int(text_config.num_attention_heads)
        self.settings: Settings | None = None
        self.pool: Any = None
        self.positions: list[np.ndarray] = []  # per row: the KV positions of its stored tokens
        self._steps = 0
        self._step: Step | None = None
        layers = [TilegraphLayer(self, i) for i in range(text_config.num_hidden_layers)]
        super().__init__(layers=layers)
        if dtype is not None:
            num_kv_heads, head_dim = kv_head_shape(text_config)
            empty = torch.empty(1, num_kv_heads, 0, head_dim, dtype=dtype, device=device)
            for layer in layers:
                layer.lazy_initialization(empty, empty)

    def ensure_pool(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
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
        self.device = device

    def step_for_layer(self, layer: TilegraphLayer, mask: torch.Tensor, window_left: int, batch_size: int, q_len: int) -> tuple[Step, BatchLayout]:
        """The forward's step (allocated by the first layer to get here, reused by the others) and this
        layer's validated layout."""
        kv_len = mask.shape[-1]
        if layer.steps == self._steps:
            self._step = self._allocate(read_mask(mask, batch_size, q_len, kv_len), mask, window_left)
            self._steps += 1
        elif layer.steps != self._steps - 1 or self._step is None or self._step.view.shape != (batch_size, q_len, kv_len):
            raise StateError(
                f"TilegraphCache layer {layer.layer_idx} is out of step with the others "
                "(every layer must see the same batch each forward)"
            )
        layout = self._step.layout(mask, window_left, self.device)
        layer.steps += 1
        layer.pending = False
        return self._step, layout

    def _allocate(self, view: MaskView, mask: torch.Tensor, window_left: int) -> Step:
        """Check the first layer's mask against what is stored, then take the pages (nothing changes on error)."""
        pool = self.pool
        batch_size, q_len, kv_len = view.shape
        rows = list(range(batch_size))
        held = pool.request_ids
        if held and held != rows:
            raise InputError(f"the batch changed from {len(held)} to {batch_size} rows: a TilegraphCache serves one batch")
        positions = self.positions or [np.zeros(0, np.int64) for _ in rows]
        stored = np.zeros((batch_size, kv_len), dtype=bool)
        for row, held_positions in enumerate(positions):
            if held_positions.size and held_positions[-1] >= min(view.offset, kv_len):
                raise InputError(
                    f"row {row}: the cache holds a token at position {held_positions[-1]} but the call's queries start "
                    f"at {view.offset} (kv_len {kv_len}): the mask and the cache disagree"
                )
            stored[row, held_positions] = True
        first = batch_layout(view, window_left, self.device, stored=stored)
        new = [np.nonzero(view.real_q[row])[0] + view.offset for row in rows]
        append = pool.allocate_step(rows, [len(n) for n in new])
        table = pool.page_table(rows)
        self.positions = [np.concatenate([old, n]) for old, n in zip(positions, new)]

        def on_device(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int32)).to(self.device)

        step = Step(
            key=("paged", next(_step_serials)),
            view=view,
            stored=stored,
            batch_indices=on_device(append.batch_indices),
            positions=on_device(append.positions),
            kv_indptr=on_device(table.kv_indptr),
            kv_indices=on_device(table.kv_indices),
            table=table,
        )
        step.layouts[(id(mask), window_left)] = (weakref.ref(mask), first)
        return step

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        if self.pool is not None:
            for row in self.pool.request_ids:
                self.pool.free(row)
        self.positions = []
        self._steps, self._step = 0, None
