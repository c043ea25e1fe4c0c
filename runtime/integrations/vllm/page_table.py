"""One step's host lengths for a plan on vLLM's device block table (the table itself stays on the device).

The planner reads only host lengths: query token offsets (``query_start_loc_cpu``) and KV tokens per
request (vLLM's CPU copy of ``seq_lens``). The kernels read the block table's page ids in place, so
no step copies ``block_table_tensor`` (or ``seq_lens``) from the device.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from tilegraph.errors import InputError


class StepLengths(NamedTuple):
    """Host int32 plan inputs of one step: qo_indptr [B+1], seq_lens [B], and their page count."""

    qo_indptr: np.ndarray
    seq_lens: np.ndarray
    page_refs: int  # sum of ceil(seq_len / block_size): the page references the plan reads

    @property
    def decode_rows(self) -> int:
        """Requests 0..n-1 with one query token each, then only padding (no query token, seq_len 0:
        vLLM's CUDA-graph padding): n, or 0 when the step is not a uniform single-token decode."""
        qo_lens = np.diff(self.qo_indptr)
        n = int(np.count_nonzero(qo_lens))
        if n == 0 or not (qo_lens[:n] == 1).all() or (qo_lens[n:] != 0).any() or (self.seq_lens[n:] != 0).any():
            return 0
        return n

    @property
    def uniform_decode(self) -> bool:
        """A BatchDecode step: request r reads query row r (padding requests read none of the KV)."""
        return self.decode_rows > 0


def step_lengths(query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor, num_reqs: int, block_columns: int,
                 block_size: int) -> StepLengths:  # fmt: skip
    """Rows 0..num_reqs-1: query tokens from query_start_loc_cpu, KV tokens from seq_lens_cpu (a row with
    seq_len 0, e.g. padding, reads no page). Raises InputError naming the request or argument."""
    if query_start_loc_cpu.device.type != "cpu" or seq_lens_cpu.device.type != "cpu":
        raise InputError("query_start_loc_cpu and seq_lens_cpu must be CPU tensors (the host lengths of the step)")
    if query_start_loc_cpu.shape[0] < num_reqs + 1 or seq_lens_cpu.shape[0] < num_reqs:
        raise InputError(f"num_reqs={num_reqs} needs query_start_loc_cpu [{num_reqs + 1}] and seq_lens_cpu [{num_reqs}], "
                         f"got {tuple(query_start_loc_cpu.shape)} and {tuple(seq_lens_cpu.shape)}")  # fmt: skip
    qo_indptr = query_start_loc_cpu[: num_reqs + 1].to(torch.int64).numpy()
    lens = seq_lens_cpu[:num_reqs].to(torch.int64).numpy()
    if (lens < 0).any():
        raise InputError(f"seq_lens must be >= 0, got {lens.min()}")
    qo_lens = np.diff(qo_indptr)
    if (qo_lens < 0).any():
        raise InputError(f"query_start_loc must not decrease, got request {int(np.argmax(qo_lens < 0))} with {qo_lens.min()} tokens")
    if (qo_lens > lens).any():
        row = int(np.argmax(qo_lens > lens))
        raise InputError(f"request {row} has {qo_lens[row]} query tokens but seq_len {lens[row]}: query tokens must be in the KV")
    pages = (lens + block_size - 1) // block_size
    if num_reqs and pages.max(initial=0) > block_columns:
        raise InputError(f"seq_lens need {pages.max()} blocks, block_table has {block_columns} columns")
    return StepLengths(qo_indptr.astype(np.int32), lens.astype(np.int32), int(pages.sum()))
