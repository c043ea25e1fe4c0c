"""A new attention variant in a few lines: a per-head distance-decay bias, run through decode and prefill.

    python examples/custom_variant.py          # the simulator on a CPU, or a GPU when there is one

The hook gets the score (q.k * sm_scale) and the positions; its trailing argument ``rate`` is named
after the declared parameter and receives its offset in the float32 ``params`` array.
"""

from __future__ import annotations

import numpy as np
import torch

import tilegraph


def decay(score, request, qo_pos, kv_pos, qo_head, kv_head, params, rate):
    return score - params[rate + qo_head] * (qo_pos - kv_pos)


distance_decay = tilegraph.Variant("distance_decay", logits_transform=decay, params={"rate": "qo_head"})


def main() -> None:
    device = "cpu" if tilegraph.SIMULATOR else "cuda"
    settings = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, max_batch_size=2, max_num_pages=16)
    dec = tilegraph.BatchDecode(settings, variant=distance_decay, device=device)
    dec.plan(np.array([0, 3, 5], np.int32), np.arange(5, dtype=np.int32), np.array([2, 4], np.int32))
    q = torch.randn(2, 4, 16, dtype=torch.float16, device=device)
    cache = torch.randn(16, 2, 4, 2, 16, dtype=torch.float16, device=device)
    rates = torch.tensor([0.0, 0.1, 0.5, 2.0], device=device)
    out = dec.run(q, cache, params={"rate": rates})
    print(f"{distance_decay} decode: out {tuple(out.shape)}, |out| per head {out.float().norm(dim=-1)[0].tolist()}")

    # the same variant in causal prefill: request 0 appends 2 tokens to its 10-token KV, request 1 is a
    # decode row; qo_pos is each query token's own position in the KV
    pre = tilegraph.BatchPrefill(settings, causal=True, variant=distance_decay, device=device)
    pre.plan(np.array([0, 2, 3], np.int32), np.array([0, 3, 5], np.int32), np.arange(5, dtype=np.int32), np.array([2, 4], np.int32))
    q_tokens = torch.randn(3, 4, 16, dtype=torch.float16, device=device)
    out = pre.run(q_tokens, cache, params={"rate": rates})
    print(f"{distance_decay} prefill: out {tuple(out.shape)}, |out| per head {out.float().norm(dim=-1)[0].tolist()}")


if __name__ == "__main__":
    main()
