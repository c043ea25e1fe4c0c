"""The contract between the graph runtime and anything graph-aware (decode now; prefill, cascade
and variants implement the same five methods).

The runtime drives three phases, the serving engines' convention:
  1. before capture: ``graph_prepare_capture(bucket)`` makes a valid plan for a batch of ``bucket``
     requests so the forward can run (warm-up compiles every specialization; no compilation may
     happen inside a capture);
  2. during capture: ``graph_set_capturing(True)``; the object's launches bind only fixed buffers
     (``graph_buffers()``) and it refuses ``plan()``;
  3. every step, outside the graph: the user plans (host work + staging), then the runtime calls
     ``graph_before_replay()`` -- ONE async upload of the staged plan on the replay stream -- and
     checks ``graph_plan_state()`` against what was captured before replaying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class PlanState:
    """What a replay checks: a plan is fresh when its serial is newer than the last replayed one."""

    serial: int  # 0: no plan yet
    padded_batch_size: int  # the bucket the plan was made for (its q/out rows)
    key: str  # identifies the Settings and variant the plan was made under
    page_table_address: int = 0  # data_ptr of the caller's device page table the plan reads; 0: none


@runtime_checkable
class GraphAware(Protocol):
    def graph_prepare_capture(self, batch_size: int) -> None:
        """Plan a valid stand-in batch of ``batch_size`` requests (for warm-up and capture)."""

    def graph_set_capturing(self, capturing: bool) -> None:
        """While True: launches must not stage or upload anything; ``plan()`` raises StateError."""

    def graph_buffers(self) -> dict[str, torch.Tensor]:
        """The fixed device buffers a capture binds (their addresses must never change)."""

    def graph_plan_state(self) -> PlanState:
        """The plan now staged/uploaded: serial, bucket and Settings/variant key."""

    def graph_before_replay(self) -> None:
        """Upload the staged plan into the fixed buffers on the current stream (no host sync)."""


# Optional, outside the protocol (a GraphAware object need not have it): ``graph_max_rows() ->
# (rows, name)``, the most q/out rows the object can plan and the Settings field that bounds them;
# GraphRunner then refuses larger buckets up front. ``graph_after_replay()``, also optional: called
# after every replay (the attention objects' debug page-id check).
