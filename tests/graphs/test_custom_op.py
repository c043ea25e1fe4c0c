"""BatchDecode.run is the custom op torch.ops.tilegraph.batch_decode (with a fake implementation),
so a torch.compile'd model calls it without graph breaks and can then be captured by the runtime."""

from __future__ import annotations

import numpy as np
import torch

import tilegraph

SETTINGS = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=4, max_num_pages=16, num_ctas=2)  # fmt: skip


def test_compiled_forward_has_no_graph_breaks_and_matches_eager(device):
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    cache = torch.randn(16, 2, 4, 2, 16).half().to(device)
    dec.plan(np.array([0, 2, 3], np.int32), np.array([3, 5, 1], np.int32), np.array([2, 4], np.int32))

    def forward(q):
        return dec.run(q * 2, cache) + 1

    q = torch.randn(2, 4, 16).half().to(device)
    explanation = torch._dynamo.explain(forward)(q)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q), forward(q))


def test_fake_implementation_runs_on_meta_tensors():
    dec = tilegraph.BatchDecode(SETTINGS, device="cpu" if tilegraph.SIMULATOR else "cuda")
    q = torch.empty(2, 4, 16, dtype=torch.float16, device="meta")
    out = torch.empty_like(q)
    cache = torch.empty(16, 2, 4, 2, 16, dtype=torch.float16, device="meta")
    lse = torch.empty(0, 4, device="meta")
    torch.ops.tilegraph.batch_decode(dec._handle, q, cache, cache, False, out, lse, False)  # no launch, no error
    assert out.device.type == "meta"
