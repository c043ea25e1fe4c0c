"""Every public entry point of ``tilegraph.__all__`` walked with wrong types, empty containers and
out-of-range values: each raises a typed tilegraph error (or pydantic's ValidationError for
Settings) naming the argument, and every output, cache, in-place target and fixed buffer poisoned
beforehand is bit-identical afterwards. A second test checks every public name is covered."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch

import tilegraph
from tilegraph import (DeviceError, InputError, PlanError, PoolExhaustedError, StateError, UnknownRequestError,
                       VariantError)  # fmt: skip
from tilegraph.cascade import LevelTable

DEVICE = "cpu" if tilegraph.SIMULATOR else "cuda"
SETTINGS = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=2, max_num_pages=8, max_num_tokens=8, num_ctas=2)  # fmt: skip
I32 = lambda *a: np.array(a, np.int32)  # noqa: E731
T32 = lambda *a: torch.tensor(a, dtype=torch.int32, device=DEVICE)  # noqa: E731

# names that are not entry points to call with bad arguments, and why
NOT_CALLED = {
    "SIMULATOR": "a bool constant",
    "GraphAware": "a typing.Protocol (isinstance checks only; GraphRunner's cases refuse non-conforming objects)",
    "PlanState": "a record graph_plan_state() returns",
    "Plan": "a record BatchDecode.plan() returns",
    "PageTable": "a record PagePool.page_table() returns",
    "AppendIndices": "a record PagePool.allocate_step() returns",
    "TilegraphError": "the base of every error below (each case's error is one)",
    "PageTableError": "raised after a step whose device page table held an out-of-pool id "
                      "(tests/runtime/test_device_page_table.py raises it from each kernel)",
    "PageTableMovedError": "raised by a replay whose plan reads another page-table tensor "
                           "(tests/runtime/test_device_page_table.py)",
}
#: error classes: covered when some case raises exactly that class
ERRORS = ("InputError", "PlanError", "StateError", "DeviceError", "VariantError", "PoolExhaustedError", "UnknownRequestError")


class Ctx:
    """Planned objects and poisoned tensors shared by every case (nothing may change them)."""

    def __init__(self) -> None:
        s = SETTINGS
        g = torch.Generator().manual_seed(0)
        self.cache = torch.randn(8, 2, 4, 1, 16, generator=g).half().to(DEVICE)
        self.cache[5] = float("nan")  # poison: an unreferenced page
        self.q1 = torch.randn(1, 2, 16, generator=g).half().to(DEVICE)
        self.out1 = torch.full((1, 2, 16), float("nan"), dtype=torch.float16, device=DEVICE)
        self.q3 = torch.randn(3, 2, 16, generator=g).half().to(DEVICE)
        self.out3 = torch.full((3, 2, 16), float("nan"), dtype=torch.float16, device=DEVICE)
        self.k3 = torch.randn(3, 1, 16, generator=g).half().to(DEVICE)
        self.v3 = torch.randn(3, 1, 16, generator=g).half().to(DEVICE)
        self.dec = tilegraph.BatchDecode(s, device=DEVICE)
        self.dec.plan(I32(0, 1), I32(2), I32(3))
        self.fresh = tilegraph.BatchDecode(s, device=DEVICE)  # never planned
        self.soft = tilegraph.BatchDecode(s, variant=tilegraph.variants.soft_cap(5.0), device=DEVICE)
        self.soft.plan(I32(0, 1), I32(2), I32(3))
        self.pre = tilegraph.BatchPrefill(s, causal=True, device=DEVICE)
        self.pre.plan(I32(0, 3), I32(0, 1), I32(1), I32(4))
        self.rag = tilegraph.BatchPrefillRagged(s, causal=True, device=DEVICE)
        self.rag.plan(I32(0, 3), I32(0, 3))
        self.casc = tilegraph.CascadeAttention(s, num_levels=2, device=DEVICE)
        self.casc_fresh = tilegraph.CascadeAttention(s, num_levels=2, device=DEVICE)
        tables = [LevelTable(I32(0, 3), I32(0, 1), I32(3), I32(2)), LevelTable(I32(0, 3), I32(0, 1), I32(4), I32(1))]
        self.casc.plan(tables)
        self.tables = tables
        self.v = torch.full((2, 2, 16), float("nan"), device=DEVICE)  # merge targets (poisoned)
        self.s = torch.full((2, 2), float("nan"), device=DEVICE)
        self.v_ok = torch.randn(2, 2, 16, generator=g).to(DEVICE)
        self.s_ok = torch.randn(2, 2, generator=g).to(DEVICE)
        self.pool = tilegraph.PagePool(s)
        self.pool.allocate(7, 5)
        self.graph = tilegraph.SimulatedGraph()
        self.k_append = torch.randn(1, 1, 16, generator=g).half().to(DEVICE)

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {n: t for n, t in vars(self).items() if isinstance(t, torch.Tensor)}
        for name in ("dec", "soft", "pre", "rag", "fresh"):
            obj = getattr(self, name)
            named.update({f"{name}.{b}": t for b, t in obj.graph_buffers().items()})
        for i, level in enumerate(self.casc.levels):
            named.update({f"casc{i}.{b}": t for b, t in level.graph_buffers().items()})
        return named

    def state(self) -> dict[str, object]:
        snap: dict[str, object] = {n: t.detach().clone() for n, t in self.tensors().items()}
        snap["pool"] = (self.pool.num_free_pages, tuple((r, self.pool.kv_len(r), tuple(self.pool.pages(r))) for r in self.pool.request_ids))
        for name in ("dec", "soft", "pre", "rag", "fresh"):
            snap[f"{name}.plan"] = getattr(self, name).graph_plan_state()
        snap["casc.plan"] = self.casc.graph_plan_state()
        return snap


def same(a: object, b: object) -> bool:
    """Bitwise equality (NaN-safe) for tensors, == for the rest."""
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    return a == b


def meta(shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def runner(c, **kw):
    args = dict(forward=lambda inputs: inputs["q"], example_inputs={"q": torch.zeros(1, 2, 16, device=DEVICE)}, attention=c.dec)
    args.update(kw)
    return tilegraph.GraphRunner(**args)


VE = pydantic.ValidationError
BASE = dict(num_qo_heads=2, num_kv_heads=1, head_dim=16)

# (public name, label, call(ctx), error class, regex the message must match: the argument)
CASES = [
    ("Settings", "wrong type", lambda c: tilegraph.Settings(**{**BASE, "num_qo_heads": "many"}), VE, "num_qo_heads"),
    ("Settings", "zero", lambda c: tilegraph.Settings(**{**BASE, "head_dim": 0}), VE, "head_dim"),
    ("Settings", "negative", lambda c: tilegraph.Settings(**BASE, page_size=-1), VE, "page_size"),
    ("Settings", "inf", lambda c: tilegraph.Settings(**BASE, sm_scale=math.inf), VE, "sm_scale"),
    ("Settings", "huge", lambda c: tilegraph.Settings(**BASE, max_page_refs=2**40), VE, "max_page_refs"),
    ("Settings", "empty buckets", lambda c: tilegraph.Settings(**BASE, graphs={"batch_sizes": []}), VE, "batch_sizes"),
    ("Settings", "unknown", lambda c: tilegraph.Settings(**BASE, heads=3), VE, "heads"),
    ("Settings", "missing", lambda c: tilegraph.Settings(num_qo_heads=2), VE, "num_kv_heads"),
    ("GraphSettings", "zero bucket", lambda c: tilegraph.GraphSettings(batch_sizes=[0, 2]), VE, "batch_sizes"),
    ("GraphSettings", "wrong type", lambda c: tilegraph.GraphSettings(batch_sizes="big"), VE, "batch_sizes"),
    ("GraphSettings", "unknown", lambda c: tilegraph.GraphSettings(sizes=[1]), VE, "sizes"),
    ("BatchDecode", "settings dict", lambda c: tilegraph.BatchDecode(dict(BASE)), InputError, "settings"),
    ("BatchDecode", "device", lambda c: tilegraph.BatchDecode(SETTINGS, device="tpu"), DeviceError, "device"),
    ("BatchDecode", "device int", lambda c: tilegraph.BatchDecode(SETTINGS, device=3), DeviceError, "device"),
    ("BatchDecode", "variant str", lambda c: tilegraph.BatchDecode(SETTINGS, variant="soft_cap"), InputError, "variant"),
    ("BatchDecode", "hooks", lambda c: tilegraph.BatchDecode(SETTINGS, hooks=3), InputError, "hooks"),
    ("BatchDecode", "plan None", lambda c: c.dec.plan(None, I32(2), I32(3)), InputError, "kv_indptr"),
    ("BatchDecode", "plan list", lambda c: c.dec.plan([0, 1], I32(2), I32(3)), InputError, "kv_indptr"),
    ("BatchDecode", "plan float", lambda c: c.dec.plan(np.array([0.0, 1.0]), I32(2), I32(3)), InputError, "kv_indptr"),
    ("BatchDecode", "plan empty", lambda c: c.dec.plan(I32(), I32(), I32()), InputError, "kv_indptr"),
    ("BatchDecode", "plan page", lambda c: c.dec.plan(I32(0, 1), I32(9), I32(3)), InputError, "kv_indices"),
    ("BatchDecode", "plan last 0", lambda c: c.dec.plan(I32(0, 1), I32(2), I32(0)), InputError, "kv_last_page_len"),
    ("BatchDecode", "plan batch", lambda c: c.dec.plan(I32(0, 1, 2, 3), I32(1, 2, 3), I32(1, 1, 1)), PlanError, "max_batch_size"),
    ("BatchDecode", "padded float", lambda c: c.dec.plan(I32(0, 1), I32(2), I32(3), padded_batch_size=3.7), InputError, "padded_batch_size"),
    ("BatchDecode", "padded range", lambda c: c.dec.plan(I32(0, 1), I32(2), I32(3), padded_batch_size=5), PlanError, "padded_batch_size"),
    ("BatchDecode", "run q list", lambda c: c.dec.run([1.0], c.cache, out=c.out1), InputError, r"\bq\b"),
    ("BatchDecode", "run q dtype", lambda c: c.dec.run(c.q1.float(), c.cache, out=c.out1), InputError, r"\bq\b"),
    ("BatchDecode", "run q rows", lambda c: c.dec.run(c.q3, c.cache, out=c.out1), InputError, r"\bq\b"),
    ("BatchDecode", "run q meta", lambda c: c.dec.run(meta((1, 2, 16)), c.cache, out=c.out1), InputError, r"\bq\b.*meta"),
    ("BatchDecode", "run out meta", lambda c: c.dec.run(c.q1, c.cache, out=meta((1, 2, 16))), InputError, r"\bout\b.*meta"),
    ("BatchDecode", "run out shape", lambda c: c.dec.run(c.q1, c.cache, out=c.out3), InputError, r"\bout\b"),
    ("BatchDecode", "run cache", lambda c: c.dec.run(c.q1, c.cache[:, 0], out=c.out1), InputError, "kv_cache"),
    ("BatchDecode", "run cache None", lambda c: c.dec.run(c.q1, None, out=c.out1), InputError, "kv_cache"),
    ("BatchDecode", "run cache meta", lambda c: c.dec.run(c.q1, c.cache.to("meta"), out=c.out1), InputError, "kv_cache"),
    ("BatchDecode", "return_lse", lambda c: c.dec.run(c.q1, c.cache, out=c.out1, return_lse="yes"), InputError, "return_lse"),
    ("BatchDecode", "params list", lambda c: c.dec.run(c.q1, c.cache, out=c.out1, params=[1]), InputError, "params"),
    ("BatchDecode", "params unknown", lambda c: c.soft.run(c.q1, c.cache, out=c.out1, params={"cap": 1.0}), InputError, "params"),
    ("BatchDecode", "params NaN", lambda c: c.soft.set_params({"logits_soft_cap": math.nan}), InputError, "logits_soft_cap"),
    ("BatchDecode", "params negative cap", lambda c: c.soft.set_params({"logits_soft_cap": -2.0}), InputError, "logits_soft_cap"),
    ("BatchDecode", "params str", lambda c: c.soft.set_params({"logits_soft_cap": "big"}), InputError, "logits_soft_cap"),
    ("BatchDecode", "before plan", lambda c: c.fresh.run(c.q1, c.cache, out=c.out1), StateError, "plan"),
    ("BatchDecode", "capture str", lambda c: c.dec.graph_prepare_capture("4"), InputError, "batch_size"),
    ("BatchDecode", "capture big", lambda c: c.dec.graph_prepare_capture(3), InputError, "batch_size.*max_batch_size"),
    ("BatchPrefill", "capture float", lambda c: c.pre.graph_prepare_capture(2.5), InputError, "num_tokens"),
    ("BatchPrefillRagged", "capture big", lambda c: c.rag.graph_prepare_capture(99), InputError, "num_tokens.*max_num_tokens"),
    ("CascadeAttention", "capture str", lambda c: c.casc.graph_prepare_capture("x"), InputError, "num_tokens"),
    ("BatchPrefill", "causal str", lambda c: tilegraph.BatchPrefill(SETTINGS, causal="yes"), InputError, "causal"),
    ("BatchPrefill", "settings", lambda c: tilegraph.BatchPrefill(None), InputError, "settings"),
    ("BatchPrefill", "plan qo", lambda c: c.pre.plan(I32(0, 3, 2), I32(0, 1, 1), I32(1), I32(4, 1)), InputError, "qo_indptr"),
    ("BatchPrefill", "plan qo None", lambda c: c.pre.plan(None, I32(0, 1), I32(1), I32(4)), InputError, "qo_indptr"),
    ("BatchPrefill", "plan tokens", lambda c: c.pre.plan(I32(0, 9), I32(0, 1), I32(1), I32(4)), PlanError, "max_num_tokens"),
    ("BatchPrefill", "padded float", lambda c: c.pre.plan(I32(0, 3), I32(0, 1), I32(1), I32(4), padded_num_tokens=3.5), InputError, "padded_num_tokens"),
    ("BatchPrefill", "run q rows", lambda c: c.pre.run(c.q1, c.cache, out=c.out1), InputError, r"\bq\b"),
    ("BatchPrefill", "run out meta", lambda c: c.pre.run(c.q3, c.cache, out=meta((3, 2, 16))), InputError, r"\bout\b"),
    ("BatchPrefillRagged", "plan kv None", lambda c: c.rag.plan(I32(0, 3), None), InputError, "kv_indptr"),
    ("BatchPrefillRagged", "plan kv decreasing", lambda c: c.rag.plan(I32(0, 3), I32(3, 0)), InputError, "kv_indptr"),
    ("BatchPrefillRagged", "run k dtype", lambda c: c.rag.run(c.q3, c.k3.float(), c.v3, out=c.out3), InputError, r"\bk\b"),
    ("BatchPrefillRagged", "run v meta", lambda c: c.rag.run(c.q3, c.k3, meta((3, 1, 16)), out=c.out3), InputError, r"\bv\b"),
    ("BatchPrefillRagged", "run k rows", lambda c: c.rag.run(c.q3, c.k3[:1], c.v3[:1], out=c.out3), InputError, r"\bk\b"),
    ("workspace_nbytes", "settings", lambda c: tilegraph.workspace_nbytes({}, DEVICE), InputError, "settings"),
    ("workspace_nbytes", "device", lambda c: tilegraph.workspace_nbytes(SETTINGS, "tpu"), DeviceError, "device"),
    ("GraphRunner", "attention []", lambda c: runner(c, attention=[]), InputError, "attention"),
    ("GraphRunner", "attention str", lambda c: runner(c, attention="decode"), InputError, "attention"),
    ("GraphRunner", "example {}", lambda c: runner(c, example_inputs={}), InputError, "example_inputs"),
    ("GraphRunner", "buckets 0", lambda c: runner(c, buckets=[0, 2]), InputError, "buckets"),
    ("GraphRunner", "buckets big", lambda c: runner(c, buckets=[1, 3]), InputError, "buckets.*max_batch_size"),
    ("GraphRunner", "forward", lambda c: runner(c, forward=3), InputError, "forward"),
    ("GraphRunner", "step inputs", lambda c: runner(c, buckets=[1]).step([1], lambda n: None), InputError, "inputs"),
    ("GraphRunner", "replay", lambda c: runner(c, buckets=[1]).replay(1), StateError, "bucket 1"),
    ("SimulatedGraph", "replay first", lambda c: c.graph.replay(), StateError, "capture"),
    ("merge_state", "list", lambda c: tilegraph.merge_state([1], c.s_ok, c.v_ok, c.s_ok), InputError, "v_a"),
    ("merge_state", "lse dtype", lambda c: tilegraph.merge_state(c.v_ok, c.s_ok.half(), c.v_ok, c.s_ok), InputError, "s_a"),
    ("merge_state", "shapes", lambda c: tilegraph.merge_state(c.v_ok, c.s_ok, c.v_ok[:1], c.s_ok[:1]), InputError, "v_b"),
    ("merge_state", "meta", lambda c: tilegraph.merge_state(meta((2, 2, 16)), c.s_ok, c.v_ok, c.s_ok), InputError, "v_a"),
    ("merge_state", "head_dim", lambda c: tilegraph.merge_state(c.v_ok[..., :4], c.s_ok, c.v_ok[..., :4], c.s_ok), InputError, "head_dim"),
    ("merge_state_in_place", "mask dtype", lambda c: tilegraph.merge_state_in_place(c.v, c.s, c.v_ok, c.s_ok, mask=torch.ones(2, device=DEVICE)), InputError, "mask"),
    ("merge_state_in_place", "mask len", lambda c: tilegraph.merge_state_in_place(c.v, c.s, c.v_ok, c.s_ok, mask=torch.ones(3, dtype=torch.bool, device=DEVICE)), InputError, "mask"),
    ("merge_state_in_place", "strided", lambda c: tilegraph.merge_state_in_place(c.v.transpose(0, 1), c.s.t(), c.v_ok, c.s_ok), InputError, r"\bv\b"),
    ("merge_state_in_place", "other None", lambda c: tilegraph.merge_state_in_place(c.v, c.s, None, c.s_ok), InputError, "v_other"),
    ("merge_states", "3-D", lambda c: tilegraph.merge_states(c.v_ok, c.s_ok), InputError, r"\bv\b"),
    ("merge_states", "lse shape", lambda c: tilegraph.merge_states(c.v_ok[:, None], c.s_ok), InputError, r"\bs\b"),
    ("Variant", "name", lambda c: tilegraph.Variant(3), VariantError, "name"),
    ("Variant", "hook int", lambda c: tilegraph.Variant("x", logits_mask=42), VariantError, "logits_mask"),
    ("Variant", "params strs", lambda c: tilegraph.Variant("x", params=["rate"]), VariantError, "params"),
    ("Variant", "hook uncompilable", lambda c: tilegraph.Variant("x", logits_transform=_dict_hook), VariantError, "_dict_hook"),
    ("Variant", "soft cap inf", lambda c: tilegraph.variants.soft_cap(math.inf), VariantError, "logits_soft_cap"),
    ("Variant", "soft cap neg", lambda c: tilegraph.variants.soft_cap(-1.0), VariantError, "logits_soft_cap"),
    ("Variant", "window str", lambda c: tilegraph.variants.sliding_window("wide"), VariantError, "window_left"),
    ("Variant", "alibi strs", lambda c: tilegraph.variants.alibi(["a", "b"]), VariantError, "slopes"),
    ("Variant", "rope theta", lambda c: tilegraph.variants.rope(theta=None), VariantError, "theta"),
    ("Variant", "sinks strs", lambda c: tilegraph.variants.attention_sinks(["x"]), VariantError, "sinks"),
    ("Variant", "sigmoid bias", lambda c: tilegraph.variants.sigmoid_attention("b"), VariantError, "bias"),
    ("Variant", "combine str", lambda c: tilegraph.variants.combine("soft_cap"), VariantError, r"variants\[0\]"),
    ("Variant", "combine none", lambda c: tilegraph.variants.combine(), VariantError, "at least one"),
    ("Param", "shape", lambda c: tilegraph.Variant("x", params=[tilegraph.Param("a", "nonsense")]), VariantError, "shape"),
    ("Param", "name", lambda c: tilegraph.Variant("x", params=[tilegraph.Param("not a name")]), VariantError, "not an identifier"),
    ("Param", "size", lambda c: tilegraph.Variant("x", params=[tilegraph.Param("a", -3)]), VariantError, "'a'"),
    ("CascadeAttention", "levels 0", lambda c: tilegraph.CascadeAttention(SETTINGS, num_levels=0), InputError, "num_levels"),
    ("CascadeAttention", "levels str", lambda c: tilegraph.CascadeAttention(SETTINGS, num_levels="2"), InputError, "num_levels"),
    ("CascadeAttention", "levels many", lambda c: tilegraph.CascadeAttention(SETTINGS, num_levels=9), PlanError, "max_cascade_levels"),
    ("CascadeAttention", "settings", lambda c: tilegraph.CascadeAttention({}, num_levels=2), InputError, "settings"),
    ("CascadeAttention", "causal", lambda c: tilegraph.CascadeAttention(SETTINGS, num_levels=2, causal=1.5), InputError, "causal"),
    ("CascadeAttention", "plan None", lambda c: c.casc.plan(None), InputError, "levels"),
    ("CascadeAttention", "plan []", lambda c: c.casc.plan([]), InputError, "levels"),
    ("CascadeAttention", "plan ints", lambda c: c.casc.plan([1, 2]), InputError, r"levels\[0\]"),
    ("CascadeAttention", "padded", lambda c: c.casc.plan(c.tables, padded_num_tokens=2.5), InputError, "padded_num_tokens"),
    ("CascadeAttention", "before plan", lambda c: c.casc_fresh.run(c.q3, c.cache), StateError, "plan"),
    ("CascadeAttention", "run q meta", lambda c: c.casc.run(meta((3, 2, 16)), c.cache, out=c.out3), InputError, r"\bq\b"),
    ("CascadeAttention", "run out", lambda c: c.casc.run(c.q3, c.cache, out=c.out1), InputError, r"\bout\b"),
    ("LevelTable", "ints", lambda c: c.casc.plan([LevelTable(1, 2, 3, 4)] * 2), InputError, "qo_indptr"),
    ("LevelTable", "float", lambda c: c.casc.plan([LevelTable(np.zeros(2), I32(0, 1), I32(3), I32(2))] * 2), InputError, "qo_indptr"),
    ("append_kv", "k None", lambda c: tilegraph.append_kv(None, c.k_append, c.cache, T32(0), T32(0), T32(0, 1), T32(2), SETTINGS), InputError, r"\bk\b"),
    ("append_kv", "settings", lambda c: tilegraph.append_kv(c.k_append, c.k_append, c.cache, T32(0), T32(0), T32(0, 1), T32(2), {}), InputError, "settings"),
    ("append_kv", "index dtype", lambda c: tilegraph.append_kv(c.k_append, c.k_append, c.cache, T32(0).long(), T32(0), T32(0, 1), T32(2), SETTINGS), InputError, "batch_indices"),
    ("append_kv", "position", lambda c: tilegraph.append_kv(c.k_append, c.k_append, c.cache, T32(0), T32(9), T32(0, 1), T32(2), SETTINGS), InputError, "positions"),
    ("append_kv", "v meta", lambda c: tilegraph.append_kv(c.k_append, meta((1, 1, 16)), c.cache, T32(0), T32(0), T32(0, 1), T32(2), SETTINGS), InputError, r"\bv\b"),
    ("append_kv_slots", "slot dtype", lambda c: tilegraph.append_kv_slots(c.k_append, c.k_append, c.cache, T32(3), SETTINGS), InputError, "slot_mapping"),
    ("append_kv_slots", "slot range", lambda c: tilegraph.append_kv_slots(c.k_append, c.k_append, c.cache, T32(99).long(), SETTINGS), InputError, "slot_mapping"),
    ("append_kv_slots", "slot list", lambda c: tilegraph.append_kv_slots(c.k_append, c.k_append, c.cache, [3], SETTINGS), InputError, "slot_mapping"),
    ("append_kv_slots", "settings", lambda c: tilegraph.append_kv_slots(c.k_append, c.k_append, c.cache, T32(3).long(), None), InputError, "settings"),
    ("PagePool", "settings", lambda c: tilegraph.PagePool({"page_size": 4}), InputError, "settings"),
    ("PagePool", "unhashable", lambda c: c.pool.allocate(["x"], 1), InputError, "hashable"),
    ("PagePool", "ids str", lambda c: c.pool.allocate_step("ab", 1), InputError, "request_ids"),
    ("PagePool", "tokens float", lambda c: c.pool.allocate(7, 1.5), InputError, "num_tokens"),
    ("PagePool", "unknown id", lambda c: c.pool.free(99), UnknownRequestError, "request 99"),
    ("PagePool", "exhausted", lambda c: c.pool.allocate(8, 10**6), PoolExhaustedError, "max_num_pages"),
    ("profile", "wrong type", lambda c: tilegraph.profile("yes"), InputError, "use_cuda_events"),
]  # fmt: skip


def _dict_hook(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
    table = {0: score}
    return table[0]


@pytest.fixture(scope="module")
def ctx():
    return Ctx()


@pytest.mark.parametrize("name, label, call, error, match", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_arguments_raise_typed_errors_and_change_nothing(ctx, name, label, call, error, match):
    before = ctx.state()
    with pytest.raises(error, match=match) as info:
        call(ctx)
    if error is not VE:
        assert isinstance(info.value, tilegraph.TilegraphError)
    after = ctx.state()
    changed = [n for n in before if not same(before[n], after[n])]
    assert not changed, f"{name} {label}: {changed} changed"


def test_every_public_name_is_covered():
    called = {c[0] for c in CASES}
    raised = {c[3].__name__ for c in CASES}
    public = set(tilegraph.__all__)
    uncovered = public - called - set(NOT_CALLED) - set(ERRORS)
    assert not uncovered, f"public names without sweep cases: {sorted(uncovered)}"
    assert set(ERRORS) <= raised, f"error classes no case raises: {sorted(set(ERRORS) - raised)}"
    assert set(ERRORS) | set(NOT_CALLED) | called <= public | {"Param"}, "the sweep names something that is not public"
    for name in ERRORS:
        assert issubclass(getattr(tilegraph, name), tilegraph.TilegraphError)
