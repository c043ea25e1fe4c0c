"""Fixed device buffers for one attention object, and the staged plan upload.

Everything here is allocated once, in ``__init__``, with sizes that are pure functions of the
layout (Settings + device): the plan buffer the kernels read, the fp32 partial outputs/LSEs, and
two host staging buffers (pinned on a GPU). ``stage(plan)`` writes the plan into the staging
buffer not used by the previous plan; ``flush()`` then issues ONE async host-to-device copy on the
*current* stream (the one the next launch or graph replay runs on); an event per staging buffer
keeps it from being rewritten while its copy is in flight. Nothing reads device memory back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tilegraph.kernels.merge import launch_partial_merge
from tilegraph.nvtx_ranges import UPLOAD

from .checks import check_workspace_fits


class StagedUpload:
    """A fixed device int32 buffer fed through two host staging buffers (pinned on a GPU).

    ``stage(offset, words)`` writes into the staging buffer not used by the previous upload (the
    first stage after a flush picks it, waiting on its event only if its copy from two uploads ago
    is still in flight); several parts may be staged before ONE ``flush()`` copies the whole
    staging buffer to the device on the current stream. Every upload must stage all of its parts."""

    def __init__(self, num_words: int, device: torch.device) -> None:
        on_gpu = device.type == "cuda"
        self.device = device
        self.device_words = torch.zeros(num_words, dtype=torch.int32, device=device)
        self._staging = [torch.zeros(num_words, dtype=torch.int32, pin_memory=on_gpu) for _ in range(2)]
        self._staging_np = [buf.numpy() for buf in self._staging]
        self._copy_done = [torch.cuda.Event() if on_gpu else None for _ in range(2)]
        self._next = 0
        self._pending: int | None = None  # staging buffer waiting to be copied

    def stage(self, offset: int, words: np.ndarray) -> None:
        if self._pending is None:
            index = self._next
            self._next ^= 1
            done = self._copy_done[index]
            if done is not None:
                done.synchronize()  # the copy from two uploads ago must have left this staging buffer
            self._pending = index
        self._staging_np[self._pending][offset : offset + words.shape[0]] = words

    def flush(self) -> None:
        """Copy the staged parts (if any) into the device buffer on the current stream: one copy."""
        index = self._pending
        if index is None:
            return
        with UPLOAD:
            self.device_words.copy_(self._staging[index], non_blocking=True)
        done = self._copy_done[index]
        if done is not None:
            done.record(torch.cuda.current_stream(self.device))
        self._pending = None


class Workspace:
    """Device buffers: ``plan_words`` int32, ``partial_out`` / ``partial_lse`` float32, scratch.

    ``upload=(shared, offset)`` places the plan words inside another object's ``StagedUpload`` (a
    cascade's levels share one, so one step's plans reach the device in one copy)."""

    def __init__(self, layout: Any, device: torch.device, upload: tuple[StagedUpload, int] | None = None) -> None:
        check_workspace_fits(layout, device)  # PlanError naming the Settings field, before any allocation
        self.layout = layout
        self.device = device
        self._upload, self._offset = upload if upload is not None else (StagedUpload(layout.plan_words, device), 0)
        self.plan_words = self._upload.device_words[self._offset : self._offset + layout.plan_words]
        self.partial_out = torch.zeros(int(np.prod(layout.partial_out_shape())), dtype=torch.float32, device=device)
        self.partial_lse = torch.zeros(int(np.prod(layout.partial_lse_shape())), dtype=torch.float32, device=device)
        # kernels always take an LSE output and a variant-parameter array: these stand in when unused
        self.no_lse = torch.zeros(1, dtype=torch.float32, device=device)
        self.no_params = torch.zeros(1, dtype=torch.float32, device=device)
        self.sections = {
            name: self.plan_words[start:stop] for name, (start, stop) in layout.offsets().items()
        }

    @property
    def nbytes(self) -> int:
        tensors = (self.plan_words, self.partial_out, self.partial_lse)
        return sum(t.numel() * t.element_size() for t in tensors)

    def stage(self, plan_buffer: np.ndarray) -> None:
        """Write ``plan_buffer`` (int32, layout.plan_words) into the staging buffer of the next upload."""
        self._upload.stage(self._offset, plan_buffer)

    def stage_ranges(self, plan_buffer: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        """Stage only the word ranges ``ranges`` of ``plan_buffer`` (the rest of the staging buffer
        keeps older words the kernels never read); the next flush still copies it whole, once."""
        for start, stop in ranges:
            if stop > start:
                self._upload.stage(self._offset + start, plan_buffer[start:stop])

    def flush(self) -> None:
        """Copy the staged plan (if any) into the fixed device buffer on the current stream."""
        self._upload.flush()

    def launch_merge(self, settings: Any, kind: int, hooks: Any, params: torch.Tensor, out_words: torch.Tensor,
                     lse: torch.Tensor, write_lse: bool, grid: int, prefill: bool = False) -> None:  # fmt: skip
        """Launch the partial merge over this workspace's plan: split tiles' slots -> final rows of
        ``out_words`` (and ``lse``). Fixed grid; the live merge count is read on the device."""
        sec = self.sections
        launch_partial_merge(
            kind=kind,
            head_dim=settings.head_dim,
            group_size=settings.group_size,
            header=sec["header"],
            merge_slot_indptr=sec["merge_slot_indptr"],
            merge_request=sec["merge_request"],
            merge_kv_head=sec["merge_kv_head"],
            partial_out=self.partial_out,
            partial_lse=self.partial_lse,
            out_words=out_words,
            lse=lse,
            write_lse=write_lse,
            num_qo_heads=settings.num_qo_heads,
            grid=grid,
            hooks=hooks,
            kv_len=sec["kv_len"],
            params=params,
            **({"qo_indptr": sec["qo_indptr"]} if prefill else {}),
        )
