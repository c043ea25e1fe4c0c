"""One GraphRunner over several graph-aware objects, as a mixed serving step has them: a decode and a
prefill object (and a decode and a cascade) planned every step, replayed many steps in a row.

Every object numbers its plans from the one counter in tilegraph.attention and the runner checks
each object's plan against the one it last replayed: with per-class counters compared as a single
sequence, the second replay was refused ("without a new plan")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.cascade import CascadeAttention, LevelTable
from tilegraph.serving.reference import attention_reference, decode_reference, gather_kv, relative_error

SETTINGS = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=4, max_num_pages=48, max_num_tokens=8, num_ctas=2)  # fmt: skip
BUCKET = 4
STEPS = 4


def page_table(kv_lens, rng):
    pages = rng.permutation(SETTINGS.max_num_pages).astype(np.int32)
    counts = [-(-n // 4) for n in kv_lens]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(n - 1) % 4 + 1 if n else 1 for n in kv_lens], np.int32)
    return indptr, pages[: indptr[-1]], last


@pytest.fixture
def cache(device):
    return torch.randn(SETTINGS.max_num_pages, 2, 4, 1, 16).half().to(device)


def test_decode_and_prefill_share_one_runner_for_many_steps(device, cache):
    rng = np.random.default_rng()
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    pre = tilegraph.BatchPrefill(SETTINGS, causal=True, device=device)
    # a prefill plan of `rows` tokens is bucketed like decode's `rows` requests: one token count
    forward = lambda inputs: torch.stack([dec.run(inputs["q"], cache), pre.run(inputs["q"], cache)], dim=1)  # noqa: E731
    example = {"q": torch.zeros(1, 2, 16, dtype=torch.float16, device=device)}
    runner = tilegraph.GraphRunner(forward, example, attention=[dec, pre], buckets=[BUCKET])
    runner.capture_all(show_progress=False)
    for step in range(STEPS):
        rows = int(rng.integers(2, BUCKET + 1))
        dec_table = page_table(rng.integers(1, 14, rows).tolist(), rng)
        kv_len = int(rng.integers(rows, 12))  # one prefill request of `rows` query tokens over kv_len tokens
        pre_table = page_table([kv_len], rng)
        qo_indptr = np.array([0, rows], np.int32)
        q = torch.randn(rows, 2, 16).half().to(device)

        def plan(padded):
            dec.plan(*dec_table, padded_batch_size=padded)
            pre.plan(qo_indptr, *pre_table, padded_num_tokens=padded)

        out = runner.step({"q": q}, plan, copy=True)
        assert relative_error(out[:, 0], decode_reference(q, cache, SETTINGS, *dec_table)[0]) < 4e-3, step
        k, v = gather_kv(cache, SETTINGS, torch.as_tensor(pre_table[1]).long(), kv_len)
        ref, _ = attention_reference(q, k, v, SETTINGS.sm_scale, causal_offset=kv_len - rows)
        assert relative_error(out[:, 1], ref) < 4e-3, step
    assert runner.stats.replays == STEPS and runner.stats.eager_steps == 0
    dec.plan(*dec_table, padded_batch_size=BUCKET)  # only one of the two replanned: refused
    with pytest.raises(tilegraph.StateError, match="attention object 1's plan"):
        runner.replay(BUCKET)


def test_decode_and_cascade_share_one_runner_for_many_steps(device, cache):
    rng = np.random.default_rng()
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    casc = CascadeAttention(SETTINGS, num_levels=2, device=device)
    forward = lambda inputs: torch.stack([dec.run(inputs["q"], cache), casc.run(inputs["q"], cache)], dim=1)  # noqa: E731
    example = {"q": torch.zeros(1, 2, 16, dtype=torch.float16, device=device)}
    runner = tilegraph.GraphRunner(forward, example, attention=[dec, casc], buckets=[BUCKET])
    runner.capture_all(show_progress=False)
    for step in range(STEPS):
        rows = int(rng.integers(2, BUCKET + 1))  # `rows` one-token requests under one shared prefix
        dec_table = page_table(rng.integers(1, 10, rows).tolist(), rng)
        prefix_len = int(rng.integers(1, 9))
        suffix_lens = rng.integers(1, 6, rows).tolist()
        pages = iter(rng.permutation(SETTINGS.max_num_pages).tolist())
        prefix_pages = [next(pages) for _ in range(-(-prefix_len // 4))]
        suffix_pages = [[next(pages) for _ in range(-(-n // 4))] for n in suffix_lens]
        level0 = LevelTable(np.array([0, rows], np.int32), np.array([0, len(prefix_pages)], np.int32),
                            np.array(prefix_pages, np.int32), np.array([(prefix_len - 1) % 4 + 1], np.int32))  # fmt: skip
        level1 = LevelTable(np.arange(rows + 1, dtype=np.int32),
                            np.concatenate([[0], np.cumsum([len(p) for p in suffix_pages])]).astype(np.int32),
                            np.array(sum(suffix_pages, []), np.int32),
                            np.array([(n - 1) % 4 + 1 for n in suffix_lens], np.int32))  # fmt: skip
        q = torch.randn(rows, 2, 16).half().to(device)

        def plan(padded):
            dec.plan(*dec_table, padded_batch_size=padded)
            casc.plan([level0, level1], padded_num_tokens=padded)

        out = runner.step({"q": q}, plan, copy=True)
        assert relative_error(out[:, 0], decode_reference(q, cache, SETTINGS, *dec_table)[0]) < 4e-3, step
        k0, v0 = gather_kv(cache, SETTINGS, torch.as_tensor(prefix_pages).long(), prefix_len)
        for r in range(rows):
            k1, v1 = gather_kv(cache, SETTINGS, torch.as_tensor(suffix_pages[r]).long(), suffix_lens[r])
            ref, _ = attention_reference(q[r : r + 1], torch.cat([k0, k1]), torch.cat([v0, v1]), SETTINGS.sm_scale)
            assert relative_error(out[r : r + 1, 1], ref) < 4e-3, (step, r)
    assert runner.stats.replays == STEPS and runner.stats.eager_steps == 0
