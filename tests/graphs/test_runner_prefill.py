"""A prefill step through GraphRunner: captured once per token bucket, replayed with other batches."""

from __future__ import annotations

import numpy as np
import torch

import tilegraph
from tilegraph.serving.reference import attention_reference, gather_kv, relative_error

SETTINGS = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=4, max_num_pages=32, max_num_tokens=16, num_ctas=2)  # fmt: skip


def test_prefill_token_buckets_replay_new_batches():
    device = torch.device("cpu" if tilegraph.SIMULATOR else "cuda")
    rng = np.random.default_rng()
    pre = tilegraph.BatchPrefill(SETTINGS, causal=True, device=device)
    cache = torch.randn(32, 2, 4, 1, 16).half().to(device)
    forward = lambda inputs: pre.run(inputs["q"], cache)  # noqa: E731
    example = {"q": torch.zeros(1, 2, 16, dtype=torch.float16, device=device)}
    runner = tilegraph.GraphRunner(forward, example, attention=pre, buckets=[8, 16])
    runner.capture_all(show_progress=False)
    for qo_lens, kv_lens in (([3, 2], [7, 2]), ([1, 5, 4], [9, 5, 12])):
        pages = rng.permutation(32).astype(np.int32)
        counts = [-(-n // 4) for n in kv_lens]
        kv_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        kv_indices = pages[: kv_indptr[-1]]
        last = np.array([(n - 1) % 4 + 1 for n in kv_lens], np.int32)
        qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
        q = torch.randn(int(qo_indptr[-1]), 2, 16).half().to(device)

        def plan(padded):
            pre.plan(qo_indptr, kv_indptr, kv_indices, last, padded_num_tokens=padded)

        out = runner.step({"q": q}, plan, copy=True)
        for r, (n_q, n_kv) in enumerate(zip(qo_lens, kv_lens)):
            k, v = gather_kv(cache, SETTINGS, torch.as_tensor(kv_indices[kv_indptr[r] : kv_indptr[r + 1]]).long(), n_kv)
            rows = slice(qo_indptr[r], qo_indptr[r + 1])
            ref, _ = attention_reference(q[rows], k, v, SETTINGS.sm_scale, causal_offset=n_kv - n_q)
            assert relative_error(out[rows], ref) < 4e-3
    assert runner.stats.replays == 2
