"""``Bounds``: the Settings capacities an engine integration's batch needs, shared by the
transformers and vLLM adapters (each grows its attention objects when a batch outgrows them)."""

from __future__ import annotations

from typing import NamedTuple


class Bounds(NamedTuple):
    """Settings capacities a batch needs (requests, query tokens, page indices, page references)."""

    batch: int
    tokens: int
    pages: int
    page_refs: int

    def covers(self, need: "Bounds") -> bool:
        return all(have >= want for have, want in zip(self, need))

    def grown_to(self, need: "Bounds") -> "Bounds":
        """Each field raised to the next power of two that covers the need (few workspace rebuilds)."""
        return Bounds(*(max(have, _power_of_two(want)) for have, want in zip(self, need)))


def _power_of_two(value: int) -> int:
    return max(16, 1 << (int(value) - 1).bit_length())
