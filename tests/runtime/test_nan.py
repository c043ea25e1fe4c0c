"""NaN is never hidden and never leaks, through the public API (so it judges whichever kernel runs):
a NaN in q, in a visible K/V position or out of a variant's hook gives NaN in exactly the rows it
touches; NaN/Inf stored in masked positions, window positions, causal-future positions,
unreferenced pages or the unused tail of a last page never reaches an output. Split and unsplit.
(Before: a NaN score was dropped by the running max and the `> -inf` tests -- finite output --
and masked values were multiplied by a zero weight.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import variants as V
from tilegraph.serving.reference import attention_reference, decode_reference, gather_kv, relative_error

PAGE = 4
DEC = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=PAGE, dtype="float16", max_batch_size=3,
           max_num_pages=16)  # fmt: skip
SPLITS = {"unsplit": 1, "split": 8}
LENGTHS = [37, 6, 3]  # the long one splits over 8 CTAs; the last pages end part-way (tails unused)


def page_table(lengths, rng, pool=16):
    counts = [-(-n // PAGE) for n in lengths]
    pages = rng.permutation(pool)[: sum(counts)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(n - 1) % PAGE + 1 for n in lengths], np.int32)
    return indptr, pages, last


def poison_unused(cache, indptr, pages, last):
    """NaN into every unreferenced page and the unused tail of every last page (K and V)."""
    used = set(pages.tolist())
    for p in range(cache.shape[0]):
        if p not in used:
            cache[p] = float("nan")
    for r in range(len(indptr) - 1):
        tail_page = pages[indptr[r + 1] - 1]
        cache[tail_page, :, int(last[r]) :] = float("inf") if r % 2 else float("nan")


def run_decode(settings, q, cache, table, variant=None, params=None, device="cpu"):
    dec = tilegraph.BatchDecode(settings, variant=variant, device=device)
    plan = dec.plan(*table)
    out = torch.full_like(q, 7.0)
    got, lse = dec.run(q, cache, out=out, return_lse=True, params=params)
    return got.cpu().float(), lse.cpu(), plan


def kv_position(table, request, pos):
    indptr, pages, _ = table
    return int(pages[indptr[request] + pos // PAGE]), pos % PAGE


@pytest.mark.parametrize("split", SPLITS)
def test_decode_nan_in_q_reaches_only_its_row(device, split):
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**DEC, num_ctas=SPLITS[split])
    table = page_table(LENGTHS, rng)
    cache = torch.randn(16, 2, PAGE, 2, 16).half()
    clean = cache.clone()
    poison_unused(cache, *table)
    q = torch.randn(3, 4, 16).half()
    ref, _ = decode_reference(q, clean, settings, *table)
    q[0, 1, 5] = float("nan")  # request 0 (split), query head 1
    q[2, 2, 0] = float("nan")  # request 2, head 2
    got, lse, plan = run_decode(settings, q.to(device), cache.to(device), table, device=device)
    assert (plan.num_merges > 0) == (split == "split")
    nan_rows = torch.zeros(3, 4, dtype=torch.bool)
    nan_rows[0, 1] = nan_rows[2, 2] = True
    assert torch.isnan(got[nan_rows]).all() and torch.isnan(lse[nan_rows]).all()
    assert torch.isfinite(got[~nan_rows]).all() and torch.isfinite(lse[~nan_rows]).all()
    assert relative_error(got[~nan_rows], ref[~nan_rows]) < 4e-3


@pytest.mark.parametrize("split", SPLITS)
def test_decode_nan_in_a_visible_key_or_value_reaches_its_kv_heads_rows(device, split):
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**DEC, num_ctas=SPLITS[split])
    table = page_table(LENGTHS, rng)
    cache = torch.randn(16, 2, PAGE, 2, 16).half()
    clean = cache.clone()
    poison_unused(cache, *table)
    q = torch.randn(3, 4, 16).half()
    ref, _ = decode_reference(q, clean, settings, *table)
    page, slot = kv_position(table, 0, 30)
    cache[page, 0, slot, 1, 3] = float("nan")  # K of request 0, kv_head 1 (query heads 2, 3)
    page, slot = kv_position(table, 1, 2)
    cache[page, 1, slot, 0, 9] = float("nan")  # V of request 1, kv_head 0 (query heads 0, 1)
    got, lse, _ = run_decode(settings, q.to(device), cache.to(device), table, device=device)
    nan_rows = torch.zeros(3, 4, dtype=torch.bool)
    nan_rows[0, 2:] = True
    nan_rows[1, :2] = True
    assert torch.isnan(got[0, 2:]).all() and torch.isnan(lse[0, 2:]).all()
    assert torch.isnan(got[1, :2, 9]).all()  # a NaN value reaches its own dimension of the rows
    assert torch.isfinite(got[~nan_rows]).all()
    assert relative_error(got[~nan_rows], ref[~nan_rows]) < 4e-3


@pytest.mark.parametrize("split", SPLITS)
def test_decode_nan_in_window_masked_positions_never_leaks(device, split):
    rng = np.random.default_rng()
    window = 4
    settings = tilegraph.Settings(**DEC, num_ctas=SPLITS[split])
    table = page_table(LENGTHS, rng)
    cache = torch.randn(16, 2, PAGE, 2, 16).half()
    q = torch.randn(3, 4, 16).half()
    outs = []
    for r, n in enumerate(LENGTHS):  # reference: each request's last window + 1 tokens only
        pages = torch.as_tensor(table[1][table[0][r] : table[0][r + 1]]).long()
        k, v = gather_kv(cache, settings, pages, n)
        first = max(0, n - window - 1)
        outs.append(attention_reference(q[r : r + 1], k[first:], v[first:], settings.sm_scale)[0])
    ref = torch.cat(outs)
    poison_unused(cache, *table)
    for r, n in enumerate(LENGTHS):  # NaN / Inf in every position the window masks
        for pos in range(max(0, n - window - 1)):
            page, slot = kv_position(table, r, pos)
            cache[page, :, slot] = float("nan") if pos % 2 else float("-inf")
    got, lse, _ = run_decode(settings, q.to(device), cache.to(device), table, variant=V.sliding_window(window), device=device)
    assert torch.isfinite(got).all() and torch.isfinite(lse).all()
    assert relative_error(got, ref) < 4e-3


def _nan_for_inf_gain(score, request, qo_pos, kv_pos, qo_head, kv_head, params, gain):
    g = params[gain + qo_head]
    return score + (g - g)  # inf - inf = NaN for a head whose gain is inf


def test_decode_nan_from_a_variant_parameter_shows(device):
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**DEC, num_ctas=1)
    table = page_table([5, 9], rng)
    cache = torch.randn(16, 2, PAGE, 2, 16).half()
    q = torch.randn(2, 4, 16).half()
    variant = tilegraph.Variant("nan_gain", logits_transform=_nan_for_inf_gain, params={"gain": "qo_head"})
    gains = torch.tensor([1.0, math.inf, 2.0, 3.0])
    got, lse, _ = run_decode(settings, q.to(device), cache.to(device), table, variant=variant,
                             params={"gain": gains}, device=device)  # fmt: skip
    assert torch.isnan(got[:, 1]).all() and torch.isnan(lse[:, 1]).all()
    keep = [0, 2, 3]
    assert relative_error(got[:, keep], decode_reference(q, cache, settings, *table)[0][:, keep]) < 4e-3


PRE = dict(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=PAGE, dtype="float16", max_batch_size=2,
           max_num_pages=16, max_num_tokens=16)  # fmt: skip


@pytest.mark.parametrize("num_ctas", [1, 4])
def test_prefill_causal_nan_reaches_the_rows_that_see_it_only(device, num_ctas):
    """One request, 6 queries over 40 KV tokens: NaN in K at position 36 reaches the query rows
    whose causal window includes it (rows 2..5) and no earlier row; a NaN q reaches its row only."""
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**PRE, num_ctas=num_ctas)
    qo_len, kv_len = 6, 40
    table = page_table([kv_len], rng)
    qo = np.array([0, qo_len], np.int32)
    cache = torch.randn(16, 2, PAGE, 1, 16).half()
    q = torch.randn(qo_len, 2, 16).half()
    k, v = gather_kv(cache, settings, torch.as_tensor(table[1]).long(), kv_len)
    ref, _ = attention_reference(q, k, v, settings.sm_scale, kv_len - qo_len)
    poison_unused(cache, *table)
    page, slot = kv_position(table, 0, 36)
    cache[page, 0, slot, 0, 4] = float("nan")
    page, slot = kv_position(table, 0, 39)  # seen by the last row only: its V dimension 2
    cache[page, 1, slot, 0, 2] = float("nan")
    q[0, 1, 7] = float("nan")
    pre = tilegraph.BatchPrefill(settings, causal=True, device=device)
    plan = pre.plan(qo, *table)
    got, lse = pre.run(q.to(device), cache.to(device), out=torch.full_like(q, 7.0).to(device), return_lse=True)
    got, lse = got.cpu().float(), lse.cpu()
    assert (plan.num_merges > 0) == (num_ctas > 1), plan
    expect_nan = torch.zeros(qo_len, 2, dtype=torch.bool)
    expect_nan[2:, :] = True  # K[36] is visible from row 2 on (36 <= 34 + i)
    expect_nan[0, 1] = True
    assert torch.isnan(lse[expect_nan]).all() and torch.isnan(got[expect_nan]).all()
    assert torch.isfinite(got[~expect_nan]).all() and torch.isfinite(lse[~expect_nan]).all()
    assert relative_error(got[~expect_nan], ref[~expect_nan]) < 4e-3


def test_merge_state_nan_lse_shows_and_empty_state_never_leaks(device):
    v_a = torch.randn(3, 2, 16).to(device)
    v_b = torch.randn(3, 2, 16).to(device)
    s_a = torch.randn(3, 2).to(device)
    s_b = torch.randn(3, 2).to(device)
    s_a[0, 1] = float("nan")  # shows in row (0, 1)
    s_b[1, 0] = float("-inf")  # an empty state whose values are NaN: contributes nothing
    v_b[1, 0] = float("nan")
    v, s = tilegraph.merge_state(v_a, s_a, v_b, s_b)
    v, s = v.cpu(), s.cpu()
    assert torch.isnan(v[0, 1]).all() and torch.isnan(s[0, 1])
    assert torch.equal(v[1, 0], v_a[1, 0].cpu()) and s[1, 0] == s_a[1, 0].cpu()
    finite = torch.ones(3, 2, dtype=torch.bool)
    finite[0, 1] = False
    assert torch.isfinite(v[finite]).all() and torch.isfinite(s[finite]).all()
