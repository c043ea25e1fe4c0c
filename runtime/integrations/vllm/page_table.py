"""vLLM's per-step block table to tilegraph's CSR page table, on the host.

On a CUDA build this reads ``seq_lens`` and ``block_table_tensor`` back from the device (a
device-to-host copy each step) until tilegraph's kernels read a device-resident page table.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from tilegraph.errors import InputError


class PageTable(NamedTuple):
    """Plan inputs of one step: qo_indptr [B+1], kv_indptr [B+1], kv_indices, kv_last_page_len [B]."""

    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    kv_last_page_len: np.ndarray


def page_table(query_start_loc_cpu: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, num_reqs: int, block_size: int) -> PageTable:
    """Rows 0..num_reqs-1: query tokens from query_start_loc, KV = the first ceil(seq_len / block_size)
    blocks of the row (a row with seq_len 0, e.g. padding, gets no pages)."""
    qo_indptr = query_start_loc_cpu[: num_reqs + 1].to(torch.int64).numpy().astype(np.int32)
    lens = seq_lens[:num_reqs].to("cpu", torch.int64).numpy()
    if (lens < 0).any():
        raise InputError(f"seq_lens must be >= 0, got {lens.min()}")
    qo_lens = np.diff(qo_indptr)
    if (qo_lens > lens).any():
        row = int(np.argmax(qo_lens > lens))
        raise InputError(f"request {row} has {qo_lens[row]} query tokens but seq_len {lens[row]}: query tokens must be in the KV")
    pages = (lens + block_size - 1) // block_size
    if num_reqs and pages.max(initial=0) > block_table.shape[1]:
        raise InputError(f"seq_lens need {pages.max()} blocks, block_table has {block_table.shape[1]} columns")
    table = block_table[:num_reqs].to("cpu", torch.int64).numpy()
    kv_indptr = np.zeros(num_reqs + 1, dtype=np.int32)
    np.cumsum(pages, out=kv_indptr[1:])
    columns = np.arange(table.shape[1])[None, :] < pages[:, None]
    kv_indices = table[columns].astype(np.int32)  # row-major: each row's blocks in order
    last = np.where(pages > 0, lens - (pages - 1) * block_size, 0).astype(np.int32)
    return PageTable(qo_indptr, kv_indptr, kv_indices, last)
