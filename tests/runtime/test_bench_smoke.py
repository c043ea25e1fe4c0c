"""The prefill and hf bench suites on the simulator: ``--smoke`` runs one tiny case through every code
path that can run here and writes the suite's JSON; without ``--smoke`` they refuse (exit 3).
No timing is asserted: benchmarks are not tests."""

from __future__ import annotations

import itertools
import json
import sys

import pytest

import tilegraph
from tilegraph.__main__ import main as tilegraph_main

try:
    import matplotlib  # noqa: F401

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False

pytestmark = pytest.mark.skipif(not tilegraph.SIMULATOR, reason="checks the simulator-side behaviour of the bench suites")


@pytest.mark.parametrize("suite", ["prefill", "hf"])
def test_suite_refuses_on_the_simulator_without_smoke(suite, tmp_path, capsys):
    assert tilegraph_main(["bench", suite, "--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert f"bench {suite} needs a CUDA GPU" in err and "--smoke" in err
    assert not any(tmp_path.iterdir())


def test_suites_are_registered_for_the_cli_and_gpu_run(tmp_path):
    from tilegraph.tools.bench import cli
    from tilegraph.tools.gpu_run import parts

    assert {"prefill", "hf"} <= set(cli.available())
    names = {p.name for p in parts(tmp_path, quick=True)}
    assert {"bench-prefill", "bench-hf"} <= names


def brute_force_pairs(requests, causal):
    total = 0
    for qo, kv in requests:
        for i, j in itertools.product(range(qo), range(kv)):
            total += (not causal) or j <= kv - qo + i
    return total


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_counts_only_visible_pairs(causal):
    from tilegraph.tools.bench.prefill import visible_pairs

    requests = [(9, 9), (3, 12), (1, 7), (5, 5), (4, 30)]
    assert visible_pairs(requests, causal) == brute_force_pairs(requests, causal)


def test_prefill_mixes_have_the_promised_shapes():
    import argparse

    import numpy as np

    from tilegraph.tools.bench.prefill import MIXES, request_lengths

    args = argparse.Namespace(uniform_tokens=64, long_tokens=512, short_tokens=16, median_tokens=40, chunk_tokens=8)
    mixes = {mix: request_lengths(mix, 6, np.random.default_rng(0), args) for mix in MIXES}
    assert mixes["uniform"] == [(64, 64)] * 6
    assert mixes["skewed"] == [(512, 512)] + [(16, 16)] * 5
    assert all(qo == kv and 16 <= kv <= 512 for qo, kv in mixes["lognormal"])
    assert all(qo == 8 and kv > 8 for qo, kv in mixes["append"])
    assert mixes["mixed"][0][0] == 8 and all(qo == 1 for qo, _ in mixes["mixed"][1:])


def test_bench_prefill_smoke_writes_json(tmp_path):
    assert tilegraph_main(["bench", "prefill", "--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "prefill.json").read_text())
    assert data["suite"] == "prefill" and data["meta"]["smoke"] and data["meta"]["clock"] == "host"
    assert data["ceilings"]["matmul_bf16"]["tflops"] > 0
    assert {"num_qo_heads", "num_kv_heads", "head_dim", "page_size", "dtype"} <= set(data["shape"])
    rows = {(r["mask"], r["impl"]): r for r in data["rows"]}
    assert set(rows) == {(m, i) for m in ("causal", "full") for i in ("tilegraph", "tilegraph-ragged", "sdpa-varlen", "sdpa")}
    shape = data["shape"]
    for mask in ("causal", "full"):
        ours = rows[(mask, "tilegraph")]
        requests = [(9, 9), (3, 3)]  # the smoke case: skewed, B=2
        assert ours["flops"] == 4 * shape["head_dim"] * shape["num_qo_heads"] * brute_force_pairs(requests, mask == "causal")
        for impl in ("tilegraph", "tilegraph-ragged"):
            row = rows[(mask, impl)]
            assert row["rel_err"] < 1e-2 and row["tflops"] > 0 and row["median_us"] > 0
            assert {"matmul_fraction", "balance", "plan_us", "p90_us"} <= set(row)
        assert rows[(mask, "sdpa-varlen")]["skipped"]  # CUDA only
        assert len({r["flops"] for r in data["rows"] if r["mask"] == mask}) == 1  # every impl charged the same work
    assert rows[("causal", "sdpa")]["rel_err"] < 1e-2  # padded flash SDPA is exact for causal qo = kv ...
    assert "no mask" in rows[("full", "sdpa")]["skipped"]  # ... and refused where padding would change rows
    assert (tmp_path / "prefill.png").exists() == HAS_MATPLOTLIB


def test_bench_hf_smoke_writes_json(tmp_path):
    pytest.importorskip("transformers")
    assert tilegraph_main(["bench", "hf", "--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "hf.json").read_text())
    assert data["suite"] == "hf" and data["meta"]["smoke"] and data["model"]["layers"] == 2
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"sdpa", "tilegraph", "tilegraph-paged"}
    for row in rows.values():
        assert "skipped" not in row, row
        assert row["tokens_match"] is True and row["first_divergence"] is None  # fp32: greedy tokens identical
        assert row["generate_ms"] > 0 and row["tokens_per_s"] > 0 and row["new_tokens"] == 3
        assert {"prefill_ms", "decode_ms_per_token", "ms_per_token", "speedup_vs_sdpa", "prompt_tokens"} <= set(row)
    assert rows["tilegraph-paged"]["cache"] == "paged" and rows["tilegraph"]["cache"] == "dynamic"
    assert (tmp_path / "hf.png").exists() == HAS_MATPLOTLIB


def test_bench_hf_without_transformers_skips_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert tilegraph_main(["bench", "hf", "--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "hf.json").read_text())
    assert "transformers is not usable" in data["skipped"] and data["rows"] == []
    assert "bench hf skipped" in capsys.readouterr().out
