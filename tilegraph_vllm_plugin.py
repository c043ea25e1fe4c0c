"""tilegraph's ``vllm.general_plugins`` entry point: registers the TILEGRAPH attention backend
(``tilegraph.integrations.vllm.backend``) by class path only.

A top-level module, outside the ``tilegraph`` package: vLLM loads general plugins in every process,
and importing anything under ``tilegraph`` imports numba-cuda, whose objects crash the CPU
platform's start-up scan of loaded modules. tilegraph is imported only when vLLM resolves the class.
"""

from __future__ import annotations

import os

BACKEND_NAME = "TILEGRAPH"
REPLACE_CPU_ATTN = "TILEGRAPH_VLLM_REPLACE_CPU_ATTN"  # =1: vLLM's CPU platform, which always picks CPU_ATTN, gets tilegraph
BACKEND_PATH = "tilegraph.integrations.vllm.backend.TilegraphBackend"


def register() -> None:
    """Add TILEGRAPH to vLLM's attention backend registry (once per process); with
    TILEGRAPH_VLLM_REPLACE_CPU_ATTN=1 also put it in place of CPU_ATTN (the CPU platform ignores the
    backend asked for and always resolves CPU_ATTN)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH)
    if os.environ.get(REPLACE_CPU_ATTN) == "1":
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
