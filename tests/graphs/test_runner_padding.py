"""Padded bucket rows write nothing, on the simulator's SimulatedGraph as on a CUDA graph: the output
tensor the attention object allocates itself (``torch.empty`` inside the captured forward) keeps,
in its padded rows, whatever it held before the replay -- bit for bit. The stand-in used to replay
the captured ``empty`` as a copy of fresh memory into the static output, writing those rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.serving.reference import decode_reference, relative_error

SETTINGS = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=4, max_num_pages=16, num_ctas=2)  # fmt: skip
BUCKET = 4


def table(lengths, rng):
    counts = [-(-n // 4) for n in lengths]
    pages = rng.permutation(SETTINGS.max_num_pages)[: sum(counts)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(n - 1) % 4 + 1 for n in lengths], np.int32)
    return indptr, pages, last


@pytest.mark.parametrize("return_lse", [False, True])
def test_padded_rows_of_an_allocated_output_keep_their_bits(device, return_lse):
    rng = np.random.default_rng()
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    cache = torch.randn(SETTINGS.max_num_pages, 2, 4, 1, 16).half().to(device)

    def forward(inputs):
        if return_lse:
            return dec.run(inputs["q"], cache, return_lse=True)[1]  # the LSE [B, Hq], also torch.empty
        return dec.run(inputs["q"], cache)  # out allocated by run(): torch.empty inside the capture

    example = {"q": torch.zeros(1, 2, 16, dtype=torch.float16, device=device)}
    runner = tilegraph.GraphRunner(forward, example, attention=dec, buckets=[BUCKET])
    runner.capture_all(show_progress=False)
    static_out = runner._graphs[BUCKET].output
    for step in range(2):
        lengths = rng.integers(1, 12, 3).tolist()
        t = table(lengths, rng)
        q = torch.randn(3, 2, 16).half().to(device)
        static_out[3:] = float("nan") if step else 12.5  # poison the padded row
        before = static_out[3:].clone()
        out = runner.run({"q": q}, *t, copy=True)
        if not return_lse:
            assert relative_error(out, decode_reference(q, cache, SETTINGS, *t)[0]) < 4e-3
        if device.type == "cuda":
            torch.cuda.synchronize()
        after = static_out[3:]
        assert torch.equal(after.view(torch.int16 if after.dtype == torch.float16 else torch.int32),
                           before.view(torch.int16 if before.dtype == torch.float16 else torch.int32)), step
