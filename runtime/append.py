"""``tilegraph.append_kv``: write a step's new K/V rows into the paged cache (FlashInfer's
``append_paged_kv_cache`` semantics).

    append_kv(k, v, kv_cache, batch_indices, positions, kv_indptr, kv_indices, settings)
    append_kv_slots(k, v, kv_cache, slot_mapping, settings)   # vLLM's reshape_and_cache addressing

Row i of k/v (token i of the step) goes to request ``b = batch_indices[i]`` at position
``p = positions[i]`` of its KV: page ``kv_indices[kv_indptr[b] + p // page_size]``, slot
``p % page_size``. The page table must already include the pages the new tokens land on
(``tilegraph.PagePool`` grows it before the step).

CUDA graphs: the launch shape depends only on nnz (k's first dimension), no host sync happens and
the index arrays are read on the device, so a captured append replays with whatever the fixed
index buffers hold. Pad a bucket with rows whose batch index is **-1**: every row with a negative
batch index is skipped.

``append_kv_slots`` addresses rows by flat slot instead: row i goes to page ``slot_mapping[i] //
page_size``, position ``slot_mapping[i] % page_size`` (``slot_mapping`` int64 [nnz], vLLM's;
**-1** = padding, skipped). Same launch shape, same copy, same layouts (any cache form
``tilegraph.kv_cache`` accepts, strided views included), graph-capturable the same way.

Bad input discipline: shapes, dtypes, devices, strides and alignment are checked before any launch
(``InputError`` naming the argument). Index *contents* live on the device, and reading them there
would need a sync, so on a GPU they are not validated: the kernel instead skips every row that
would land outside its request's pages (request outside the page table, negative position,
``p // page_size >= kv_indptr[b+1] - kv_indptr[b]``, page outside the cache). On CPU tensors (the
simulator) the contents are also validated on the host (``check_values=True``) and such rows, or
two rows aimed at the same slot, raise ``InputError`` instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tilegraph._device import resolve_device
from tilegraph.errors import InputError
from tilegraph.kernels.append import APPEND_ARGS, SLOT_APPEND_ARGS, append_kv_kernel, append_kv_slots_kernel, append_launch, default_threads
from tilegraph.kernels.launch import launch

from .kv_cache import KVCache, PagedKV, paged_kv
from .settings import Settings


def append_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache,
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    settings: Settings,
    *,
    device: str | torch.device | None = None,
    check_values: bool = True,
) -> None:
    """Copy k/v ``[nnz, num_kv_heads, head_dim]`` (Settings dtype) into ``kv_cache`` in place.

    k and v may be strided views (e.g. slices of a fused QKV output) whose last dim is contiguous
    and whose data pointer and dim-0/dim-1 strides are 16-byte aligned.
    kv_cache: NHD/HND 5-D tensor or a (k_cache, v_cache) pair (see ``tilegraph.kv_cache``).
    batch_indices [nnz], positions [nnz], kv_indptr [B+1], kv_indices [num_page_refs]: contiguous
    int32 tensors on the kernel's device; batch index -1 marks a padded row (skipped).
    device: where the kernel runs (default: k's device).
    check_values: on CPU tensors, also validate the index contents on the host (pass False when
    capturing into the simulator's graph stand-in, whose fixed buffers hold placeholder values at
    capture time; the kernel still skips out-of-range rows). Ignored on a GPU.
    """
    dev, nnz = _check_new_rows(k, v, settings, device)
    _check_index("batch_indices", batch_indices, dev, nnz)
    _check_index("positions", positions, dev, nnz)
    _check_index("kv_indptr", kv_indptr, dev, None)
    _check_index("kv_indices", kv_indices, dev, None)
    if kv_indptr.shape[0] < 1:
        raise InputError("kv_indptr must have B+1 >= 1 entries, got 0")
    kv = paged_kv(kv_cache, settings, dev)
    if check_values and dev.type == "cpu":
        _check_values(batch_indices, positions, kv_indptr, kv_indices, settings.page_size, kv.num_pages)
    if nnz == 0:
        return
    _launch(k, v, kv, batch_indices, positions, kv_indptr, kv_indices, settings)


def append_kv_slots(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache,
    slot_mapping: torch.Tensor,
    settings: Settings,
    *,
    device: str | torch.device | None = None,
    check_values: bool = True,
) -> None:
    """Copy k/v ``[nnz, num_kv_heads, head_dim]`` into ``kv_cache`` at flat slots ``slot_mapping``
    (int64 [nnz] on the kernel's device; slot = page * page_size + position in page; -1 skips the
    row), vLLM's ``reshape_and_cache`` semantics. k, v and the cache as for ``append_kv``.
    check_values: on CPU tensors, also check on the host that every slot is -1 or inside the cache
    and that no two rows share one (on a GPU the kernel skips slots outside the cache)."""
    dev, nnz = _check_new_rows(k, v, settings, device)
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype != torch.int64:
        got = slot_mapping.dtype if isinstance(slot_mapping, torch.Tensor) else type(slot_mapping).__name__
        raise InputError(f"slot_mapping must be an int64 torch.Tensor (vLLM's slot mapping), got {got}")
    if slot_mapping.device != dev:
        raise InputError(f"slot_mapping is on {slot_mapping.device}, but it must be on the kernel's device ({dev})")
    if slot_mapping.dim() != 1 or not slot_mapping.is_contiguous() or slot_mapping.shape[0] != nnz:
        raise InputError(f"slot_mapping must be a contiguous 1-D tensor of nnz={nnz} entries, got shape {tuple(slot_mapping.shape)}")
    kv = paged_kv(kv_cache, settings, dev)
    if check_values and dev.type == "cpu":
        _check_slots(slot_mapping, settings.page_size, kv.num_pages)
    if nnz == 0:
        return
    shape = _launch_shape(k, settings)
    values = SLOT_APPEND_ARGS.values(slot_mapping=slot_mapping, **_copy_values(k, v, kv, settings))
    launch("append_kv_slots", append_kv_slots_kernel(), shape.grid, shape.block, values)


def _check_slots(slot_mapping: torch.Tensor, page_size: int, num_pages: int) -> None:
    slots = slot_mapping.numpy()
    bad = (slots < -1) | (slots >= num_pages * page_size)
    if np.any(bad):
        row = int(np.argmax(bad))
        raise InputError(f"slot_mapping[{row}]={slots[row]} is outside [-1, num_pages * page_size = {num_pages * page_size})")
    live = slots[slots >= 0]
    unique, counts = np.unique(live, return_counts=True)
    if np.any(counts > 1):
        slot = int(unique[np.argmax(counts > 1)])
        rows = np.flatnonzero(slots == slot).tolist()
        raise InputError(f"rows {rows} of k/v write the same cache slot {slot} (page {slot // page_size}, slot {slot % page_size})")


def _check_new_rows(k: object, v: object, settings: Any, device: Any) -> tuple[torch.device, int]:
    """k and v checked (``_check_rows``) on the kernel's device (default: k's); returns it and nnz."""
    if not isinstance(settings, Settings):
        raise InputError(f"settings must be a tilegraph.Settings, got {type(settings).__name__}")
    if not isinstance(k, torch.Tensor):
        raise InputError(f"k must be a torch.Tensor, got {type(k).__name__}")
    dev = resolve_device(device if device is not None else k.device)
    _check_rows("k", k, settings, dev)
    _check_rows("v", v, settings, dev)
    if v.shape != k.shape:
        raise InputError(f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    return dev, k.shape[0]


def _copy_values(k: torch.Tensor, v: torch.Tensor, kv: PagedKV, settings: Settings) -> dict[str, Any]:
    """The launch arguments both append kernels take (new rows, cache views and strides), by name."""
    k_words, k_token_stride, k_head_stride = _row_words(k)
    v_words, v_token_stride, v_head_stride = _row_words(v)
    i64 = np.int64
    return dict(
        k_words=k_words, k_token_stride=i64(k_token_stride), k_head_stride=i64(k_head_stride),
        v_words=v_words, v_token_stride=i64(v_token_stride), v_head_stride=i64(v_head_stride),
        k_cache_words=kv.k_words, v_cache_words=kv.v_words, page_stride=i64(kv.page_stride),
        token_stride=i64(kv.token_stride), head_stride=i64(kv.head_stride), page_size=i64(settings.page_size),
        num_pages=i64(kv.num_pages), num_kv_heads=i64(settings.num_kv_heads),
        row_words=i64(settings.head_dim * k.element_size() // 4),
    )  # fmt: skip


def _launch_shape(k: torch.Tensor, settings: Settings) -> Any:
    return append_launch(k.shape[0], settings.num_kv_heads, settings.head_dim * k.element_size() // 4, default_threads())


def _check_rows(name: str, t: object, settings: Settings, device: torch.device) -> None:
    shape = (settings.num_kv_heads, settings.head_dim)
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != settings.torch_dtype:
        raise InputError(f"{name} has dtype {t.dtype}, Settings.dtype is {settings.dtype}")
    if t.device != device:
        raise InputError(f"{name} is on {t.device}, the kernel runs on {device}")
    if t.dim() != 3 or tuple(t.shape[1:]) != shape:
        raise InputError(
            f"{name} must be [nnz, num_kv_heads={shape[0]}, head_dim={shape[1]}], got {tuple(t.shape)}"
        )
    if t.stride(2) != 1:
        raise InputError(f"{name}'s last dimension must be contiguous (stride 1)")
    item = t.element_size()
    if t.data_ptr() % 16 or (t.stride(0) * item) % 16 or (t.stride(1) * item) % 16:
        raise InputError(f"{name} must be 16-byte aligned: its data pointer and its strides of dims 0 and 1 (in bytes)")


def _check_index(name: str, t: object, device: torch.device, length: int | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be an int32 torch.Tensor on {device}, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise InputError(f"{name} must be int32, got {t.dtype}")
    if t.device != device:
        raise InputError(f"{name} is on {t.device}, but index arrays must be on the kernel's device ({device})")
    if t.dim() != 1 or not t.is_contiguous():
        raise InputError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise InputError(f"{name} has {t.shape[0]} entries but k and v have nnz={length} rows")


def _check_values(
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    page_size: int,
    num_pages: int,
) -> None:
    """Host checks of index contents (CPU tensors only): every non-padded row lands in a page of
    its own request, inside the cache, and no two rows share a slot."""
    indptr = kv_indptr.numpy().astype(np.int64)
    indices = kv_indices.numpy().astype(np.int64)
    batch = batch_indices.numpy().astype(np.int64)
    pos = positions.numpy().astype(np.int64)
    num_requests = indptr.shape[0] - 1
    if indptr[0] < 0 or np.any(np.diff(indptr) < 0) or indptr[-1] > indices.shape[0]:
        raise InputError(
            f"kv_indptr must be non-decreasing from >= 0 to at most len(kv_indices)={indices.shape[0]}, "
            f"got {indptr.tolist()}"
        )
    live = batch >= 0
    rows = np.flatnonzero(live)
    if np.any(batch[live] >= num_requests):
        row = rows[np.argmax(batch[live] >= num_requests)]
        raise InputError(f"batch_indices[{row}]={batch[row]} but the page table has B={num_requests} requests")
    b, p = batch[live], pos[live]
    if np.any(p < 0):
        row = rows[np.argmax(p < 0)]
        raise InputError(f"positions[{row}]={pos[row]} is negative")
    page_in_request = p // page_size
    pages_held = indptr[b + 1] - indptr[b]
    beyond = page_in_request >= pages_held
    if np.any(beyond):
        i = int(np.argmax(beyond))
        raise InputError(
            f"positions[{rows[i]}]={p[i]} needs page {page_in_request[i]} of request {b[i]}, which has "
            f"{pages_held[i]} pages (page_size={page_size}): grow the page table before appending"
        )
    pages = indices[indptr[b] + page_in_request]
    outside = (pages < 0) | (pages >= num_pages)
    if np.any(outside):
        i = int(np.argmax(outside))
        entry = indptr[b[i]] + page_in_request[i]
        raise InputError(f"kv_indices[{entry}]={pages[i]} is outside the cache's {num_pages} pages")
    slots = pages * page_size + p % page_size
    unique, counts = np.unique(slots, return_counts=True)
    if np.any(counts > 1):
        slot = unique[np.argmax(counts > 1)]
        clash = rows[slots == slot].tolist()
        page, offset = divmod(int(slot), page_size)
        raise InputError(f"rows {clash} of k/v write the same cache slot (page {page}, slot {offset})")


def _row_words(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A flat int32 view of the storage t [nnz, H, D] spans, and its token/head strides in words."""
    per_word = 4 // t.element_size()
    span = (t.shape[0] - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) + t.shape[2]
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset())
    return flat.view(torch.int32), t.stride(0) // per_word, t.stride(1) // per_word


def _launch(
    k: torch.Tensor,
    v: torch.Tensor,
    kv: PagedKV,
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    settings: Settings,
) -> None:
    shape = _launch_shape(k, settings)
    values = APPEND_ARGS.values(batch_indices=batch_indices, positions=positions, kv_indptr=kv_indptr,
                                kv_indices=kv_indices, **_copy_values(k, v, kv, settings))  # fmt: skip
    launch("append_kv", append_kv_kernel(), shape.grid, shape.block, values)
