"""Launches are thread-safe: two threads, each planning and running its own BatchDecode, both get
the float64 reference (the simulator used to crash: 'Thread' object has no attribute 'threadIdx')."""

from __future__ import annotations

import threading

import numpy as np
import torch

import tilegraph
from tilegraph.serving import reference

DEVICE = "cpu" if tilegraph.SIMULATOR else "cuda"


def _decode_in_thread(seed: int, results: dict, errors: list) -> None:
    try:
        settings = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, max_batch_size=2,
                                      max_num_pages=8, dtype=torch.float32, num_ctas=2)  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        cache = torch.randn(8, 2, 4, 1, 16, generator=g).to(DEVICE)
        q = torch.randn(1, 2, 16, generator=g).to(DEVICE)
        indptr, indices, last = np.array([0, 2], np.int32), np.array([seed % 8, (seed + 3) % 8], np.int32), np.array([3], np.int32)
        dec = tilegraph.BatchDecode(settings, device=DEVICE)
        dec.plan(indptr, indices, last)
        out = dec.run(q, cache)
        ref, _ = reference.decode_reference(q, cache, settings, indptr, indices, last)
        results[seed] = (out, ref)
    except Exception as exc:  # reported by the main thread
        errors.append(repr(exc))


def test_two_threads_each_run_their_own_decode():
    results: dict = {}
    errors: list = []
    threads = [threading.Thread(target=_decode_in_thread, args=(seed, results, errors)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [1, 2]
    for out, ref in results.values():
        assert reference.relative_error(out, ref) < 1e-5
