"""Host-side planner: page table -> balanced work tiles over persistent CTAs (no torch.cuda)."""

from .decode import plan_decode
from .layout import DecodeLayout
from .plan import TILE_OVERHEAD_TOKENS, Plan

__all__ = ["plan_decode", "DecodeLayout", "Plan", "TILE_OVERHEAD_TOKENS"]
