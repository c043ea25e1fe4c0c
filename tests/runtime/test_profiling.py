"""tilegraph.profile(): aggregation, JSON export, the CUDA-event discipline (with fake events), and
one real tiny plan + run on the simulator inside a session. No timing is asserted."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import nvtx_ranges, profiling
from tilegraph.profiling import profile

SETTINGS = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=2, max_num_pages=8, num_ctas=1)  # fmt: skip


def closed_session(**kwargs) -> profiling.ProfileSession:
    with profile(**kwargs) as prof:
        pass
    return prof


def row(rows, phase, name=None):
    (found,) = [r for r in rows if r["phase"] == phase and r["name"] == (name or phase)]
    return found


def test_summary_aggregates_synthetic_timings():
    prof = closed_session(use_cuda_events=False)
    for host_us in (4.0, 1.0, 100.0, 3.0, 2.0):
        prof.record("plan", "plan", host_us)
    for device_us in (10.0, 30.0, 20.0):
        prof.record("launch", "decode", host_us=5.0, device_us=device_us)
    prof.record("launch", "partial_merge", host_us=7.0, device_us=None, in_capture=True)
    rows = prof.summary()
    assert [(r["phase"], r["name"]) for r in rows] == [("plan", "plan"), ("launch", "decode"), ("launch", "partial_merge")]
    plan = row(rows, "plan")
    assert plan["count"] == 5 and plan["clock"] == "host"
    assert plan["median_us"] == 3.0 and plan["total_us"] == 110.0
    assert plan["p90_us"] == pytest.approx(np.percentile([1, 2, 3, 4, 100], 90))
    decode = row(rows, "launch", "decode")
    assert decode["clock"] == "cuda-event" and decode["median_us"] == 20.0 and decode["host_median_us"] == 5.0
    assert decode["total_us"] == 60.0 and decode["in_capture"] == 0
    assert row(rows, "launch", "partial_merge")["in_capture"] == 1


def test_plan_stats_and_json_export(tmp_path):
    prof = closed_session(use_cuda_events=False)
    prof.record("upload", "upload", 2.0)
    for balance, tiles in ((0.9, 10), (0.5, 30), (0.7, 20)):
        prof.record_plan(SimpleNamespace(batch_size=4, num_tiles=tiles, num_ctas=8, balance=balance, makespan=100.0))
    prof.record_plan(SimpleNamespace())  # a plan without stats: NaN balance, exported as null
    stats = prof.plan_summary()
    assert stats["count"] == 4
    path = prof.to_json(tmp_path / "p" / "profile.json")
    data = json.loads(path.read_text())
    assert data["clock"] == "host"
    assert data["phases"] == prof.summary()
    assert data["plans"]["count"] == 4 and data["plans"]["balance_median"] is None  # NaN -> null
    assert data["samples"] == [{"phase": "upload", "name": "upload", "host_us": 2.0, "device_us": None, "in_capture": False}]
    table = prof.table()
    assert table.row_count == 1 and "4 plans" in str(table.caption)


def test_results_only_after_exit_and_one_entry():
    with profile(use_cuda_events=False) as prof:
        with pytest.raises(tilegraph.StateError, match="still open"):
            prof.summary()
    with pytest.raises(tilegraph.StateError):
        prof.__enter__()
    assert prof.summary() == []


def test_ranges_feed_the_session_and_capture_is_host_only():
    outside = nvtx_ranges.get_range("launch", "before-session")
    outside.__enter__()  # begun before the session: its end is ignored
    with profile(use_cuda_events=False) as prof:
        outside.__exit__(None, None, None)
        with nvtx_ranges.PLAN:
            nvtx_ranges.note_plan(SimpleNamespace(batch_size=1, num_tiles=2, num_ctas=1, balance=1.0, makespan=3.0))
        with nvtx_ranges.CAPTURE:
            with nvtx_ranges.launch_range("decode"):
                pass
        with nvtx_ranges.launch_range("decode"):
            pass
    rows = prof.summary()
    assert [(r["phase"], r["name"], r["count"]) for r in rows] == [
        ("plan", "plan", 1), ("capture", "capture", 1), ("launch", "decode", 2)]  # fmt: skip
    assert row(rows, "launch", "decode")["in_capture"] == 1
    assert prof.plan_summary()["count"] == 1
    with nvtx_ranges.PLAN:  # after exit: the session no longer listens
        pass
    assert sum(r["count"] for r in prof.summary()) == 4


class FakeEvent:
    log: list = []

    def __init__(self) -> None:
        self.when = None

    def record(self) -> None:
        self.when = len(FakeEvent.log)
        FakeEvent.log.append("record")

    def synchronize(self) -> None:
        FakeEvent.log.append("sync")

    def elapsed_time(self, end: "FakeEvent") -> float:
        return (end.when - self.when) * 1e-3  # ms


def test_cuda_events_recorded_around_device_phases_read_only_at_exit(monkeypatch):
    FakeEvent.log = []
    capturing = {"now": False}
    monkeypatch.setattr(profiling, "_new_events", lambda: [FakeEvent() for _ in range(4)])
    monkeypatch.setattr(profiling, "_stream_capturing", lambda: capturing["now"])
    with profile(use_cuda_events=True) as prof:
        with nvtx_ranges.PLAN:  # host phase: no events
            pass
        with nvtx_ranges.launch_range("decode"):
            pass
        with nvtx_ranges.UPLOAD:
            pass
        capturing["now"] = True  # a torch graph capture on the current stream: no events
        with nvtx_ranges.launch_range("decode"):
            pass
        capturing["now"] = False
        for _ in range(3):  # more events than the first chunk holds
            with nvtx_ranges.REPLAY:
                pass
        assert "sync" not in FakeEvent.log  # nothing waits for the device inside the session
        assert FakeEvent.log.count("record") == 2 * 5
    assert FakeEvent.log.count("sync") == 5
    rows = prof.summary()
    assert row(rows, "plan")["clock"] == "host"
    assert row(rows, "launch", "decode")["clock"] == "mixed"
    assert row(rows, "launch", "decode")["in_capture"] == 1
    assert row(rows, "replay")["clock"] == "cuda-event" and row(rows, "replay")["count"] == 3
    assert row(rows, "upload")["median_us"] == pytest.approx(1.0)  # one record apart, in the fake's units


def test_real_plan_and_run_inside_a_session(device):
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    kv_indptr, kv_indices, kv_last = np.array([0, 2, 3], np.int32), np.array([5, 1, 6], np.int32), np.array([3, 2], np.int32)
    cache = torch.randn(8, 2, 4, 1, 16).half().to(device)
    q = torch.randn(2, 2, 16).half().to(device)
    with profile() as prof:
        plan = dec.plan(kv_indptr, kv_indices, kv_last)
        dec.run(q, cache)
    rows = prof.summary()
    assert [(r["phase"], r["name"], r["count"]) for r in rows] == [
        ("plan", "plan", 1), ("upload", "upload", 1), ("launch", "decode", 1), ("launch", "partial_merge", 1)]  # fmt: skip
    assert all(r["median_us"] > 0 for r in rows)
    stats = prof.plan_summary()
    assert stats["count"] == 1 and stats["balance_median"] == pytest.approx(float(plan.balance))
    assert stats["num_tiles_median"] == plan.num_tiles


def test_gpu_run_profile_part_in_tiny_size(tmp_path):
    from tilegraph.tools.gpu_run import profile_decode_steps

    result = profile_decode_steps(tmp_path / "profile.json", steps=2, tiny=True)
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["steps"] == 2
    eager = {(r["phase"], r["name"]): r["count"] for r in data["eager"]["phases"]}
    assert eager == {("plan", "plan"): 2, ("upload", "upload"): 2, ("launch", "decode"): 2, ("launch", "partial_merge"): 2}
    assert data["eager"]["plans"]["count"] == 2
    graphs = {(r["phase"], r["name"]): r for r in data["graphs"]["phases"]}
    assert graphs[("plan", "plan")]["count"] >= 2  # the two steps' plans, plus the capture stand-ins
    assert graphs[("launch", "decode")]["count"] == 2  # the warm-up's and the one recorded by the capture
    if ("capture", "capture") in graphs:  # the graph runtime opens CAPTURE/REPLAY ranges
        assert graphs[("launch", "decode")]["in_capture"] == 1
        assert graphs[("replay", "replay")]["count"] == 2
    assert result["graphs"] == data["graphs"]
