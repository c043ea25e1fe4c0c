"""AttentionBase and the public methods other modules (CascadeAttention, GraphRunner) use on attention
objects: host-side planning without staging, staging, caller positions, params checked without
writing, the plan serial shared by every kind, and the moved modules' old import paths."""

from __future__ import annotations

import importlib
import sys
import warnings

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import variants
from tilegraph.attention import AttentionBase, instance, next_plan_serial, padded_rows
from tilegraph.errors import InputError, PlanError, StateError
from tilegraph.planner.validation import as_index_array

SETTINGS = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=4, max_num_pages=16, max_num_tokens=16, num_ctas=2)  # fmt: skip
TABLE = (np.array([0, 3, 5], np.int32), np.array([0, 2, 3], np.int32), np.array([4, 5, 6], np.int32), np.array([2, 3], np.int32))


def test_every_attention_kind_is_one_base_with_one_handle_registry(device):
    objects = [tilegraph.BatchDecode(SETTINGS, device=device), tilegraph.BatchPrefill(SETTINGS, device=device),
               tilegraph.BatchPrefillRagged(SETTINGS, causal=True, device=device)]  # fmt: skip
    assert all(isinstance(o, AttentionBase) for o in objects)
    assert len({o.handle for o in objects}) == 3 and all(instance(o.handle) is o for o in objects)
    assert [o.graph_max_rows() for o in objects] == [(4, "max_batch_size"), (16, "max_num_tokens"), (16, "max_num_tokens")]
    keys = {o.plan_key for o in objects}
    assert len(keys) == 3 and any(k.startswith("prefill:ragged:causal|") for k in keys)
    with pytest.raises(InputError, match="settings must be a tilegraph.Settings"):
        tilegraph.BatchPrefill(dict(num_qo_heads=4), device=device)


def test_plans_of_every_kind_share_one_serial_sequence(device):
    dec, pre = tilegraph.BatchDecode(SETTINGS, device=device), tilegraph.BatchPrefill(SETTINGS, device=device)
    first = dec.plan(*TABLE[1:]).serial
    second = pre.plan(*TABLE).serial
    third = next_plan_serial()
    assert first < second < third


def test_make_plan_stages_nothing_until_stage_prefill_plan(device):
    pre = tilegraph.BatchPrefill(SETTINGS, device=device)
    current = pre.plan(*TABLE)
    planned = pre.make_plan(*TABLE, serial=12345)
    assert planned.serial == 12345 and pre.current_plan is current and pre.rows == 5
    pre.stage_prefill_plan(planned, padded_num_tokens=8)
    assert pre.current_plan is planned and pre.rows == 8 and pre.graph_plan_state().serial == 12345
    with pytest.raises(PlanError, match=r"padded_num_tokens=17 must lie in \[qo_indptr\[-1\]=5, max_num_tokens=16\]"):
        pre.stage_prefill_plan(planned, 17)
    assert pre.rows == 8  # refused: nothing changed


@pytest.mark.parametrize("value, error", [(3.7, InputError), (True, InputError), ("4", InputError), (2, PlanError), (5, PlanError)])
def test_padded_rows_takes_integers_in_range_only(value, error):
    with pytest.raises(error, match="padded_batch_size"):
        padded_rows(value, "padded_batch_size", 3, "B", 4, "max_batch_size")
    assert padded_rows(None, "padded_batch_size", 3, "B", 4, "max_batch_size") == 3
    assert padded_rows(np.int64(4), "padded_batch_size", 3, "B", 4, "max_batch_size") == 4


def test_bind_positions_joins_the_graph_buffers_and_checks_its_buffers(device):
    pre = tilegraph.BatchPrefill(SETTINGS, device=device)
    assert pre.positions is None and "row_qo_pos" not in pre.graph_buffers()
    rows, offsets = torch.zeros(16, dtype=torch.int32, device=device), torch.zeros(4, dtype=torch.int32, device=device)
    pre.bind_positions(rows, offsets)
    assert pre.positions == (rows, offsets)
    assert pre.graph_buffers()["row_qo_pos"] is rows and pre.graph_buffers()["entry_kv_offset"] is offsets
    with pytest.raises(InputError, match="int32"):
        pre.bind_positions(rows.long(), offsets)
    pre.bind_positions(None)
    assert pre.positions is None


def test_check_params_checks_everything_and_writes_nothing(device):
    dec = tilegraph.BatchDecode(SETTINGS, device=device, variant=variants.soft_cap(30.0))
    before = dec.params.clone()
    checked = dec.check_params({"logits_soft_cap": 50.0})
    assert torch.equal(dec.params, before) and float(checked["logits_soft_cap"]) == 50.0
    dec.write_checked_params(checked)
    assert float(dec.params[dec.param_layout.offset("logits_soft_cap")]) == 50.0
    with pytest.raises(InputError, match="unknown"):
        dec.check_params({"nope": 1.0})
    with pytest.raises(InputError, match="params must be a dict"):
        dec.check_params([("logits_soft_cap", 1.0)])
    assert dec.missing_params == []


def test_param_context_needs_a_plan_and_reports_its_lengths(device):
    pre = tilegraph.BatchPrefill(SETTINGS, device=device)
    with pytest.raises(StateError, match="plan"):
        pre.param_context()
    pre.plan(*TABLE)
    context = pre.param_context()
    assert context.kv_len.tolist() == [6, 3] and context.qo_len.tolist() == [3, 2]


def test_check_q_and_check_out_follow_the_current_plan(device):
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    dec.plan(*TABLE[1:], padded_batch_size=4)
    q = torch.randn(4, 4, 16).half().to(device)
    assert dec.check_q(q) is q and dec.check_out(torch.empty_like(q)) is not None
    with pytest.raises(InputError, match="q has batch size 2 but the plan was made for 4"):
        dec.check_q(q[:2])
    with pytest.raises(InputError, match="out must have shape"):
        dec.check_out(q[:2].contiguous())


def test_variant_queries_and_without_sink():
    sinks = variants.combine(variants.soft_cap(), variants.attention_sinks())
    assert sinks.has_sink and sinks.has_hook("logits_transform") and not sinks.has_hook("output_transform")
    bare = sinks.without_sink()
    assert not bare.has_sink and bare.has_hook("logits_transform") and bare.params == sinks.params
    assert variants.soft_cap().without_sink().has_hook("logits_transform")
    assert variants.custom_mask().has_encoded_inputs and not sinks.has_encoded_inputs
    with pytest.raises(InputError, match="unknown hook kind"):
        sinks.has_hook("nope")


def test_as_index_array_names_the_argument():
    assert as_index_array(np.arange(3, dtype=np.int32), "x").tolist() == [0, 1, 2]
    with pytest.raises(InputError, match="kv_indptr must be int32"):
        as_index_array(np.arange(3), "kv_indptr")
    with pytest.raises(InputError, match="qo_indptr must be 1-D"):
        as_index_array(np.zeros((2, 2), np.int32), "qo_indptr")


@pytest.mark.parametrize("old, new", [("tilegraph.bench.cli", "tilegraph.tools.bench.cli"), ("tilegraph.demo", "tilegraph.serving.demo"),
                                      ("tilegraph.models.llama", "tilegraph.serving.llama"), ("tilegraph.reference", "tilegraph.serving.reference"),
                                      ("tilegraph.gpu_run", "tilegraph.tools.gpu_run"), ("tilegraph.kernels.compile_check", "tilegraph.tools.compile_check")])  # fmt: skip
def test_moved_modules_keep_their_old_path_for_one_release(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # import it afresh: the alias warns then
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)  # the same module object: nothing loaded twice
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
