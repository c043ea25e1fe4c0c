"""One prefill-kernel launch over a prefill plan, then its partial merge: what the prefill objects and
BatchDecode's tensor-core engine (one-token prefill requests) share."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tilegraph.kernels.launch import launch
from tilegraph.kernels.merge import PARTIAL_MERGE_SIGNATURE, partial_merge_kernel
from tilegraph.kernels.prefill import PREFILL_ARGS, prefill_signature

from .compiling import compile_with_progress
from .kv_cache import PagedKV


def launch_prefill_kernel(attn: Any, kernel: Any, block: tuple[int, ...], label: str, q: torch.Tensor, kv: PagedKV,
                          out: torch.Tensor, lse: torch.Tensor | None, no_positions: torch.Tensor,
                          positions: tuple[torch.Tensor, torch.Tensor] | None = None, shared_bytes: int = 0) -> None:  # fmt: skip
    """Compile (once) and launch ``kernel`` (kernels.prefill or kernels.prefill_mma, same arguments)
    over ``attn``'s current prefill plan on its fixed grid, then the partial merge (no host sync).
    ``attn``: an AttentionBase whose q strides are prefill's (q_stride_n, q_stride_h).
    ``positions``: caller positions (row_qo_pos, entry_kv_offset), else request-local ones
    (``no_positions``: a one-word int32 stand-in). ``shared_bytes``: the kernel's dynamic shared
    memory (kernels.prefill_mma: its config's dynamic_shared_bytes; the CUDA-core kernel: 0)."""
    compile_with_progress(label, [(kernel, prefill_signature()),
                                  (partial_merge_kernel(attn.kind_code, attn.hooks, True), PARTIAL_MERGE_SIGNATURE)])  # fmt: skip
    out_words = attn.output_words(out)
    lse_arg = lse.view(-1) if lse is not None else attn.workspace.no_lse
    row_qo_pos, entry_kv_offset = positions or (no_positions, no_positions)
    values = PREFILL_ARGS.values(
        **attn.plan_sections(PREFILL_ARGS.names),
        **attn.shared_launch_values(q, kv, out_words, lse_arg, lse is not None),
        row_qo_pos=row_qo_pos, entry_kv_offset=entry_kv_offset, use_positions=np.int32(positions is not None),
        **attn.page_div_values,
    )  # fmt: skip
    launch("prefill", kernel, (attn.num_ctas,), block, values, shared_bytes)
    attn.launch_partial_merge(out_words, lse, prefill=True)


__all__ = ["launch_prefill_kernel"]
