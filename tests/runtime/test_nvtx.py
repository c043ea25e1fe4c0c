"""NVTX ranges through a recording stand-in for the nvtx API: names, domain, category, order."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import nvtx_ranges

SETTINGS = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=2, max_num_pages=8, num_ctas=1)  # fmt: skip


class RecordingDomain:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def get_event_attributes(self, message=None, color=None, category=None):
        return {"domain": self.name, "message": message, "category": category, "color": color}

    def push_range(self, attributes) -> None:
        self.log.append(("push", attributes["domain"], attributes["category"], attributes["message"]))

    def pop_range(self) -> None:
        self.log.append(("pop", self.name))


class RecordingNvtx:
    """What tilegraph uses of the nvtx module: get_domain(name) -> a domain."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def get_domain(self, name: str) -> RecordingDomain:
        return RecordingDomain(self.log, name)


@pytest.fixture
def recorder():
    standin = RecordingNvtx()
    previous = nvtx_ranges.use_nvtx(standin)
    try:
        yield standin
    finally:
        nvtx_ranges.use_nvtx(previous)


def pushed(log: list[tuple]) -> list[tuple]:
    return [entry[1:] for entry in log if entry[0] == "push"]


def assert_balanced(log: list[tuple]) -> None:
    depth = 0
    for entry in log:
        depth += 1 if entry[0] == "push" else -1
        assert depth >= 0, log
        if entry[0] == "pop":
            assert entry[1] == "tilegraph"
    assert depth == 0, log


def tiny_batch(device):
    kv_indptr = np.array([0, 2, 3], np.int32)
    kv_indices = np.array([5, 1, 6], np.int32)
    kv_last = np.array([3, 2], np.int32)
    cache = torch.randn(8, 2, 4, 1, 16).half().to(device)
    q = torch.randn(2, 2, 16).half().to(device)
    return (kv_indptr, kv_indices, kv_last), cache, q


def test_plan_and_run_ranges_in_order(recorder, device):
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    table, cache, q = tiny_batch(device)
    dec.plan(*table)
    dec.run(q, cache)
    assert pushed(recorder.log) == [
        ("tilegraph", "plan", "plan"),
        ("tilegraph", "upload", "upload"),
        ("tilegraph", "launch", "decode"),
        ("tilegraph", "launch", "partial_merge"),
    ]
    assert [e[0] for e in recorder.log] == ["push", "pop"] * 4  # none nested
    recorder.log.clear()
    dec.run(q, cache)  # nothing staged: no upload range, the two launches again
    assert [p[2] for p in pushed(recorder.log)] == ["decode", "partial_merge"]
    assert_balanced(recorder.log)


def test_failing_plan_still_pops(recorder, device):
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    dec.graph_set_capturing(True)  # plan() refuses while capturing: an error raised inside the range
    with pytest.raises(tilegraph.StateError):
        dec.plan(*tiny_batch(device)[0])
    assert recorder.log == [("push", "tilegraph", "plan", "plan"), ("pop", "tilegraph")]


def test_merge_op_is_one_named_launch(recorder, device):
    v = torch.randn(3, 2, 16, device=device).half()
    s = torch.randn(3, 2, device=device)
    tilegraph.merge_state(v, s, v.clone(), s.clone())
    assert recorder.log == [("push", "tilegraph", "launch", "merge_state"), ("pop", "tilegraph")]


def test_phases_and_cached_ranges():
    for name, rng in (("plan", nvtx_ranges.PLAN), ("upload", nvtx_ranges.UPLOAD),
                      ("capture", nvtx_ranges.CAPTURE), ("replay", nvtx_ranges.REPLAY)):  # fmt: skip
        assert (rng.phase, rng.name) == (name, name)
    assert nvtx_ranges.launch_range("decode") is nvtx_ranges.launch_range("decode")
    assert nvtx_ranges.launch_range("decode").phase == "launch"
    with pytest.raises(ValueError, match="unknown phase"):
        nvtx_ranges.Range("compile", "x")


def test_injection_rebuilds_hoisted_attributes(recorder):
    assert nvtx_ranges.PLAN.attributes == {"domain": "tilegraph", "message": "plan", "category": "plan",
                                           "color": nvtx_ranges.PHASE_COLORS["plan"]}  # fmt: skip
    with nvtx_ranges.REPLAY:
        with nvtx_ranges.launch_range("k"):
            pass
    assert recorder.log == [("push", "tilegraph", "replay", "replay"), ("push", "tilegraph", "launch", "k"),
                            ("pop", "tilegraph"), ("pop", "tilegraph")]  # fmt: skip


def test_disabled_nvtx_reaches_no_domain_but_listeners(monkeypatch):
    seen = []

    class Listener:
        def range_begin(self, phase, name):
            seen.append(("begin", phase, name))

        def range_end(self, phase, name):
            seen.append(("end", phase, name))

        def plan_made(self, plan):
            seen.append(("plan", plan))

    monkeypatch.setenv("NVTX_DISABLE", "1")
    previous = nvtx_ranges.use_nvtx(None)
    listener = Listener()
    try:
        assert not nvtx_ranges.nvtx_live()
        with nvtx_ranges.UPLOAD:
            pass
        nvtx_ranges.add_listener(listener)
        with nvtx_ranges.UPLOAD:
            nvtx_ranges.note_plan("p")
    finally:
        nvtx_ranges.remove_listener(listener)
        nvtx_ranges.use_nvtx(previous)
    assert seen == [("begin", "upload", "upload"), ("plan", "p"), ("end", "upload", "upload")]


runner_source = inspect.getsource(tilegraph.GraphRunner)


@pytest.mark.skipif("nvtx_ranges" not in runner_source, reason="graphs/runner.py does not open CAPTURE/REPLAY ranges yet")
def test_graph_runner_capture_and_replay_ranges(recorder, device):
    settings = tilegraph.Settings(**{**SETTINGS.model_dump(), "graphs": {"batch_sizes": [2]}})
    dec = tilegraph.BatchDecode(settings, device=device)
    table, cache, q = tiny_batch(device)
    runner = tilegraph.GraphRunner(lambda inputs: dec.run(inputs["q"], cache), {"q": q}, attention=dec)
    runner.capture_all(show_progress=False)
    assert ("tilegraph", "capture", "capture") in pushed(recorder.log)
    recorder.log.clear()
    runner.run({"q": q}, *table)
    names = [p[1] for p in pushed(recorder.log)]
    assert names == ["plan", "upload", "replay"]
    assert_balanced(recorder.log)
