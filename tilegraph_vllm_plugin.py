"""The ``vllm.general_plugins`` entry point: registers the TILEGRAPH backend by class path only.

Nothing of tilegraph's kernels is imported here (vLLM's CPU platform scans the loaded modules when
it starts; the backend module, and with it numba-cuda, is imported only when vLLM resolves it).
"""

from __future__ import annotations

BACKEND_NAME = "TILEGRAPH"
BACKEND_PATH = "tilegraph.integrations.vllm.backend.TilegraphBackend"


def register() -> None:
    """Add TILEGRAPH to vLLM's attention backend registry (once per process)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH)
