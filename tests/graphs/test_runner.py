"""Graph capture/replay discipline: on the simulator through SimulatedGraph, on a GPU (marked gpu,
its own invocation) through torch.cuda.CUDAGraph. Capture with one plan, re-plan with other
lengths, replay, match the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import StateError
from tilegraph.serving.reference import decode_reference, relative_error

SETTINGS = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16",
                              max_batch_size=6, max_num_pages=48, num_ctas=4,
                              graphs={"batch_sizes": [2, 4]})  # fmt: skip


def page_table(lengths, rng):
    counts = [-(-n // SETTINGS.page_size) for n in lengths]
    pages = rng.permutation(SETTINGS.max_num_pages)[: sum(counts)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(n - 1) % SETTINGS.page_size + 1 if n else 1 for n in lengths], np.int32)
    return indptr, pages, last


def build(device, debug=False):
    dec = tilegraph.BatchDecode(SETTINGS, device=device)
    cache = torch.randn(SETTINGS.max_num_pages, 2, 4, 2, 16).half().to(device)

    def forward(inputs):
        # aten ops around the attention call replay too: a fill and q * 2 before, + 1 after
        q = inputs["q"]
        out = torch.full(q.shape, 7.0, dtype=q.dtype, device=q.device)
        dec.run(q * 2, cache, out=out)
        return out + 1

    example = {"q": torch.zeros(1, 4, 16, dtype=torch.float16, device=device)}
    runner = tilegraph.GraphRunner(forward, example, attention=dec, debug=debug)
    runner.capture_all(show_progress=False)
    return dec, cache, runner


def expected(q, cache, table):
    ref, _ = decode_reference(q.double() * 2, cache, SETTINGS, *table)
    return ref + 1


def check_step(dec, cache, runner, lengths, rng, device):
    table = page_table(lengths, rng)
    q = torch.randn(len(lengths), 4, 16).half().to(device)
    out = runner.run({"q": q}, *table, copy=True)
    assert out.shape == q.shape
    assert relative_error(out, expected(q, cache, table)) < 4e-3
    return dec.current_plan


@pytest.fixture(scope="module")
def captured():
    device = torch.device("cpu" if tilegraph.SIMULATOR else "cuda")
    return (*build(device), device)


def test_replay_follows_new_plans(captured):
    dec, cache, runner, device = captured
    rng = np.random.default_rng()
    assert set(runner.stats.capture_s) == {2, 4}
    # captured with one-token stand-in requests; now longer KV, another B in the bucket, then a split
    plan = check_step(dec, cache, runner, [9, 3, 0], rng, device)
    assert plan.batch_size == 3
    plan = check_step(dec, cache, runner, [150, 2, 5, 1], rng, device)
    assert plan.num_merges > 0, "expected the 150-token request to be split over the 4 CTAs"
    check_step(dec, cache, runner, [6], rng, device)
    assert runner.stats.replays == 3 and runner.stats.eager_steps == 0


def test_padded_rows_are_not_written(captured):
    dec, cache, runner, device = captured
    rng = np.random.default_rng()
    bucket = runner._graphs[4]
    bucket.inputs["q"][3] = float("nan")  # a padded row's q: never read
    check_step(dec, cache, runner, [5, 11, 2], rng, device)
    assert (bucket.output[3] == 8).all(), "the padded row's attention output was written"


def test_above_largest_bucket_runs_eagerly(captured):
    dec, cache, runner, device = captured
    rng = np.random.default_rng()
    before = runner.stats.eager_steps
    check_step(dec, cache, runner, [3, 4, 5, 6, 7], rng, device)
    assert runner.stats.eager_steps == before + 1


def test_replay_without_new_plan_is_refused(captured):
    dec, cache, runner, device = captured
    rng = np.random.default_rng()
    check_step(dec, cache, runner, [4, 4], rng, device)
    with pytest.raises(StateError, match="without a new plan"):
        runner.replay(2)


def test_plan_for_another_bucket_is_refused(captured):
    dec, cache, runner, device = captured
    dec.plan(*page_table([3, 3, 3], np.random.default_rng()), padded_batch_size=4)
    with pytest.raises(StateError, match="bucket 4, not 2"):
        runner.replay(2)


def test_plan_during_capture_is_refused(captured):
    dec, cache, runner, device = captured
    table = page_table([3], np.random.default_rng())
    with pytest.raises(StateError, match="capture"):
        with runner.capture(1):
            dec.plan(*table)
    dec.plan(*table)  # capture mode ended with the context


def test_debug_mode_detects_moved_buffers():
    device = torch.device("cpu" if tilegraph.SIMULATOR else "cuda")
    dec, cache, runner = build(device, debug=True)
    rng = np.random.default_rng()
    check_step(dec, cache, runner, [3, 1], rng, device)
    runner._graphs[2].inputs["q"] = torch.zeros(2, 4, 16, dtype=torch.float16, device=device)  # a new address
    dec.plan(*page_table([3, 1], rng), padded_batch_size=2)
    with pytest.raises(StateError, match="moved"):
        runner.replay(2)


def test_a_kernel_argument_bypassing_the_fixed_buffers_replays_stale_data(monkeypatch):
    """The discipline has teeth: a launch bound to a private copy of the plan (not the fixed
    buffer) keeps running the captured schedule, and the replayed answer is wrong."""
    device = torch.device("cpu" if tilegraph.SIMULATOR else "cuda")
    original = tilegraph.BatchDecode.launch

    def broken_launch(self, q, kv, out, lse):
        fixed = self.workspace.sections
        self.workspace.sections = {name: t.clone() for name, t in fixed.items()}  # bypass
        try:
            original(self, q, kv, out, lse)
        finally:
            self.workspace.sections = fixed

    monkeypatch.setattr(tilegraph.BatchDecode, "launch", broken_launch)
    dec, cache, runner = build(device)
    rng = np.random.default_rng()
    table = page_table([13, 6], rng)
    q = torch.randn(2, 4, 16).half().to(device)
    out = runner.run({"q": q}, *table, copy=True)
    assert relative_error(out, expected(q, cache, table)) > 1e-2


@pytest.mark.gpu
def test_gpu_graph_is_a_real_cuda_graph():
    dec, cache, runner = build(torch.device("cuda"))
    assert isinstance(runner._graphs[2].graph, torch.cuda.CUDAGraph)
    check_step(dec, cache, runner, [300, 2], np.random.default_rng(), torch.device("cuda"))


@pytest.mark.parametrize("swap", ["settings", "variant"])
def test_plan_from_other_settings_or_variant_is_refused(swap):
    device = torch.device("cpu" if tilegraph.SIMULATOR else "cuda")
    dec, cache, runner = build(device)
    if swap == "settings":
        other = tilegraph.BatchDecode(tilegraph.Settings(**{**SETTINGS.model_dump(), "sm_scale": 0.5}), device=device)
    else:
        other = tilegraph.BatchDecode(SETTINGS, device=device, variant=tilegraph.variants.soft_cap(30.0))
    runner.attention[0] = other
    other.plan(*page_table([3, 2], np.random.default_rng()), padded_batch_size=2)
    with pytest.raises(StateError, match="other Settings or another variant"):
        runner.replay(2)
