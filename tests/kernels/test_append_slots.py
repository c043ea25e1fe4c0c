"""append_kv_slots: vLLM's reshape_and_cache addressing (flat slot = page * page_size + offset, -1 =
padding) into every cache form, bit-exact against a Python scatter, nothing else written; bad slots
refused before the launch; a captured append replays with new slots."""

from __future__ import annotations

import pytest
import torch

import tilegraph
from tilegraph.errors import InputError
from tilegraph.graphs.standin import SimulatedGraph

HKV, HD, PS, PAGES = 2, 16, 4, 6


def settings(layout="NHD"):
    return tilegraph.Settings(num_qo_heads=4, num_kv_heads=HKV, head_dim=HD, page_size=PS, dtype="bfloat16",
                              kv_layout=layout, max_batch_size=4, max_num_pages=PAGES, num_ctas=2)  # fmt: skip


def caches(device, layout):
    """(name, cache as passed to append_kv_slots, the tensor(s) behind it)."""
    inner = (PS, HKV, HD) if layout == "NHD" else (HKV, PS, HD)
    five = torch.randn(PAGES, 2, *inner).bfloat16().to(device)
    pair = (torch.randn(PAGES, *inner).bfloat16().to(device), torch.randn(PAGES, *inner).bfloat16().to(device))
    packed = torch.randn(PAGES, *inner[:2], 2 * HD).bfloat16().to(device)  # vLLM: K and V in the last dim
    return [("5-D", five, five), ("pair", pair, pair), ("packed", (packed[..., :HD], packed[..., HD:]), packed)]


def snapshot(backing):
    return tuple(t.clone() for t in backing) if isinstance(backing, tuple) else backing.clone()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_rows_land_at_their_slots_and_nowhere_else(device, layout):
    s = settings(layout)
    slots = torch.tensor([5, -1, 0, 22, 13], dtype=torch.int64, device=device)
    k, v = torch.randn(5, HKV, HD).bfloat16().to(device), torch.randn(5, HKV, HD).bfloat16().to(device)
    for name, cache, backing in caches(device, layout):
        before = snapshot(backing)
        tilegraph.append_kv_slots(k, v, cache, slots, s)
        expected = snapshot(before)
        exp_rows = caches_like(expected, name, layout)
        for i, slot in enumerate(slots.tolist()):
            if slot >= 0:
                ek, ev = exp_rows(slot)
                ek.copy_(k[i])
                ev.copy_(v[i])
        got = backing if isinstance(backing, tuple) else (backing,)
        want = expected if isinstance(expected, tuple) else (expected,)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), name


def caches_like(backing, name, layout):
    """The slot -> (k, v) rows function for a snapshot of one of ``caches``'s backings."""
    def rows(slot):
        page, off = divmod(slot, PS)
        if name == "5-D":
            k_cache, v_cache = backing[:, 0], backing[:, 1]
        elif name == "pair":
            k_cache, v_cache = backing
        else:
            k_cache, v_cache = backing[..., :HD], backing[..., HD:]
        if layout == "NHD":
            return k_cache[page, off], v_cache[page, off]
        return k_cache[page, :, off], v_cache[page, :, off]

    return rows


@pytest.mark.parametrize(
    "slots, match",
    [
        (torch.tensor([0, 24], dtype=torch.int64), r"slot_mapping\[1\]=24 is outside"),
        (torch.tensor([0, -2], dtype=torch.int64), r"slot_mapping\[1\]=-2 is outside"),
        (torch.tensor([3, 3], dtype=torch.int64), "same cache slot 3"),
        (torch.tensor([0, 1], dtype=torch.int32), "int64"),
        (torch.tensor([0], dtype=torch.int64), "nnz=2"),
    ],
    ids=["past-the-cache", "below-minus-one", "duplicate", "int32", "length"],
)
def test_bad_slots_are_refused_before_any_write(device, slots, match):
    s = settings()
    cache = torch.randn(PAGES, 2, PS, HKV, HD).bfloat16().to(device)
    before = cache.clone()
    k = torch.randn(2, HKV, HD).bfloat16().to(device)
    with pytest.raises(InputError, match=match):
        tilegraph.append_kv_slots(k, k.clone(), cache, slots.to(device), s)
    assert torch.equal(cache, before)


def test_a_captured_append_replays_with_new_slots():
    if not tilegraph.SIMULATOR:
        pytest.skip("the simulator's graph stand-in")
    s = settings()
    cache = torch.zeros(PAGES, 2, PS, HKV, HD, dtype=torch.bfloat16)
    slots = torch.full((3,), -1, dtype=torch.int64)
    k, v = torch.randn(3, HKV, HD).bfloat16(), torch.randn(3, HKV, HD).bfloat16()
    graph = SimulatedGraph()
    with graph.capture():
        tilegraph.append_kv_slots(k, v, cache, slots, s, check_values=False)
    assert not cache.any()  # captured with padding only: nothing written at capture
    slots.copy_(torch.tensor([7, -1, 9]))
    graph.replay()
    assert torch.equal(cache[1, 0, 3], k[0]) and torch.equal(cache[2, 1, 1], v[2])
    assert int((cache != 0).flatten(1).any(1).sum()) == 2  # pages 1 and 2 only
