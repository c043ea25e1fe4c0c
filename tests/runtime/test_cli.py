"""The command line: bench suites' argument handling and smoke runs, inspect-plan, gpu-run refusal."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import tilegraph
from tilegraph.__main__ import main as tilegraph_main
from tilegraph.tools.inspect_plan import parse_lengths

try:
    import matplotlib  # noqa: F401  (the bench extra: plots are drawn only where it is installed)

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False

pytestmark = pytest.mark.skipif(not tilegraph.SIMULATOR, reason="checks the simulator-side behaviour of the CLI")


def test_bench_bad_suite_is_a_usage_error(capsys):
    assert tilegraph_main(["bench", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert tilegraph_main(["bench"]) == 2


def test_suites_without_a_module_say_they_are_not_available(monkeypatch, capsys):
    from tilegraph.tools.bench import cli

    monkeypatch.setitem(cli.SUITES, "prefill", cli.SuiteInfo("GPU: paged prefill", True, "tilegraph.tools.bench.no_such_suite"))
    assert tilegraph_main(["bench", "prefill", "--smoke"]) == 2
    assert "suite 'prefill' is not available yet" in capsys.readouterr().err
    assert set(cli.SUITES) == {"plan", "decode", "merge", "prefill", "cascade", "graphs", "hf"}
    assert {"decode", "merge"} <= set(cli.available())


@pytest.mark.parametrize("suite", ["decode", "merge"])
def test_gpu_suites_refuse_on_the_simulator(suite, tmp_path, capsys):
    assert tilegraph_main(["bench", suite, "--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert f"bench {suite} needs a CUDA GPU" in err and "--smoke" in err
    assert not any(tmp_path.iterdir())


def test_suite_option_errors(tmp_path, capsys):
    assert tilegraph_main(["bench", "decode", "--smoke", "--batch-sizes", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert tilegraph_main(["bench", "decode", "--smoke", "--mixes", "uniform,bimodal"]) == 2
    assert "unknown bimodal" in capsys.readouterr().err


def test_bench_merge_smoke_writes_json_and_plot(tmp_path):
    assert tilegraph_main(["bench", "merge", "--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "merge.json").read_text())
    assert data["suite"] == "merge" and data["meta"]["smoke"] and data["meta"]["clock"] == "host"
    assert {(r["op"], r["impl"]) for r in data["rows"]} == {(op, impl) for op in ("merge_state", "merge_states") for impl in ("tilegraph", "torch")}
    assert all(r["rel_err"] < 1e-2 for r in data["rows"])
    assert (tmp_path / "merge.png").exists() == HAS_MATPLOTLIB


def test_bench_decode_smoke_writes_json_and_plot(tmp_path):
    assert tilegraph_main(["bench", "decode", "--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode.json").read_text())
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"tilegraph", "tilegraph-tensor-cores", "sdpa"}
    assert rows["tilegraph"]["rel_err"] < 1e-2 and rows["tilegraph"]["gbs"] > 0
    # the smoke shape is group 2: the table's engine is CUDA cores, the forced peer runs tensor cores
    assert rows["tilegraph"]["engine"] == "cuda_cores" and rows["tilegraph-tensor-cores"]["engine"] == "tensor_cores"
    assert rows["tilegraph-tensor-cores"]["rel_err"] < 1e-2
    assert rows["tilegraph"]["bytes_moved"] == rows["sdpa"]["bytes_moved"] > 0
    assert data["ceilings"]["copy"]["gbs"] > 0
    assert (tmp_path / "decode.png").exists() == HAS_MATPLOTLIB


def test_gpu_run_refuses_on_the_simulator(tmp_path, monkeypatch, capsys):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("gpu-run must not start anything on the simulator")

    monkeypatch.setattr("subprocess.Popen", no_subprocess)
    assert tilegraph_main(["gpu-run", "--out", str(tmp_path / "run")]) == 3
    assert "gpu-run needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_junit_summary(tmp_path):
    from tilegraph.tools.gpu_run import junit_summary

    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="t.a" name="ok"/><testcase classname="t.a" name="bad">'
                   '<failure message="boom">x</failure></testcase></testsuite></testsuites>')  # fmt: skip
    summary = junit_summary(xml)
    assert (summary["tests"], summary["failures"], summary["skipped"]) == (3, 1, 1)
    assert summary["failed"] == [{"test": "t.a::bad", "message": "boom"}]


# ---- inspect-plan ---------------------------------------------------------------------------------


def test_parse_lengths():
    assert parse_lengths("32768,512x3") == [32768, 512, 512, 512]
    assert parse_lengths("0, 7") == [0, 7]
    for bad in ("", "12,,3", "abc", "5x0", "-1", "5x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_lengths(bad)


@pytest.mark.parametrize("lengths", ["512x", "12,,3", "3y4"])
def test_inspect_plan_bad_lengths_exit_2(lengths, capsys):
    argv = ["inspect-plan", "--lengths", lengths, "--num-qo-heads", "4", "--num-kv-heads", "2", "--head-dim", "64"]
    assert tilegraph_main(argv) == 2
    assert "--lengths" in capsys.readouterr().err


def test_inspect_plan_invalid_settings_exit_2(capsys):
    argv = ["inspect-plan", "--lengths", "10", "--num-qo-heads", "6", "--num-kv-heads", "4", "--head-dim", "64"]
    assert tilegraph_main(argv) == 2
    assert "multiple of num_kv_heads" in capsys.readouterr().err


def test_inspect_plan_follows_the_decode_engine(tmp_path, capsys):
    """Group 8 (bf16): BatchDecode's tensor-core engine, so its one-token prefill plan and workspace."""
    out = tmp_path / "plan.json"
    argv = ["inspect-plan", "--lengths", "300,17x5", "--num-qo-heads", "16", "--num-kv-heads", "2",
            "--head-dim", "64", "--page-size", "16", "--num-ctas", "8", "--json", str(out)]  # fmt: skip
    assert tilegraph_main(argv) == 0
    assert "tensor_cores" in capsys.readouterr().out
    report = json.loads(out.read_text())
    settings = tilegraph.Settings(**{k: v for k, v in report["settings"].items() if k != "graphs"})
    dec = tilegraph.BatchDecode(settings, device="cpu")
    assert report["engine"] == dec.engine == "tensor_cores"
    assert report["workspace_bytes"] == dec.workspace_nbytes == tilegraph.workspace_nbytes(settings, "cpu")


@pytest.mark.skipif(not tilegraph.SIMULATOR, reason="the no-GPU default grid (an H100's SMs)")
@pytest.mark.parametrize("num_qo_heads, per_sm", [(8, 2), (16, 4)], ids=["g4-cuda-cores", "g8-tensor-cores"])
def test_inspect_plan_default_grid_follows_the_decode_engine(num_qo_heads, per_sm, tmp_path, capsys):
    """No --num-ctas: BatchDecode's grid, the engine's CTAs per SM (kernels.tuning) x an H100's SMs."""
    from tilegraph.decode import decode_ctas_per_sm

    out = tmp_path / "plan.json"
    argv = ["inspect-plan", "--lengths", "300,17x5", "--num-qo-heads", str(num_qo_heads), "--num-kv-heads", "2",
            "--head-dim", "64", "--page-size", "16", "--json", str(out)]  # fmt: skip
    assert tilegraph_main(argv) == 0
    assert f"132 SMs x {per_sm}" in " ".join(capsys.readouterr().out.split())
    report = json.loads(out.read_text())
    settings = tilegraph.Settings(**{k: v for k, v in report["settings"].items() if k != "graphs"})
    assert report["num_ctas"] == 132 * per_sm == 132 * decode_ctas_per_sm(settings)


def test_inspect_plan_matches_a_direct_plan(tmp_path, capsys):
    from tilegraph.planner.decode import plan_decode
    from tilegraph.planner.layout import DecodeLayout

    out = tmp_path / "plan.json"
    argv = ["inspect-plan", "--lengths", "32768,512x63", "--num-qo-heads", "32", "--num-kv-heads", "8",
            "--head-dim", "128", "--page-size", "16", "--num-ctas", "132", "--json", str(out)]  # fmt: skip
    assert tilegraph_main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    settings = tilegraph.Settings(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16",
                                  max_batch_size=64, max_num_pages=2048 + 63 * 32, num_ctas=132)  # fmt: skip
    layout = DecodeLayout.from_settings(settings, 132)
    pages = [2048] + [32] * 63
    kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    plan = plan_decode(layout, kv_indptr, np.arange(kv_indptr[-1], dtype=np.int32), np.full(64, 16, np.int32),
                       num_pages=settings.max_num_pages, serial=1)  # fmt: skip
    assert report["settings"]["max_batch_size"] == 64 and report["settings"]["max_num_pages"] == settings.max_num_pages
    assert report["plan"]["num_tiles"] == plan.num_tiles
    assert report["plan"]["balance"] == pytest.approx(float(plan.balance))
    assert report["plan"]["makespan"] == pytest.approx(float(plan.makespan))
    assert report["tiles_per_cta"] == np.asarray(plan.tiles_per_cta()).tolist()
    assert report["workspace_bytes"] == layout.workspace_nbytes == tilegraph.workspace_nbytes(settings, "cpu")
    assert f"{layout.workspace_nbytes:,}" in printed and f"{float(plan.balance):.3f}" in printed
    from tilegraph.planner.anchors import anchors

    expected = {a.name: a.balance for a in anchors(np.array([32768] + [512] * 63), 16, 8, 132)}
    assert {name: a["balance"] for name, a in report["plan"]["anchors"].items()} == pytest.approx(expected)


def test_gpu_run_part_is_killed_at_its_time_box(tmp_path):
    import sys

    from tilegraph.tools.gpu_run import Part, run_part

    part = Part("sleeper", 60, [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], "")
    result = run_part(part, tmp_path, timeout_s=1.0)
    assert result["timed_out"] and result["rc"] != 0 and result["seconds"] < 30
    assert "started" in (tmp_path / result["log"]).read_text()


def test_gpu_run_writes_summary_and_bundle(tmp_path, monkeypatch):
    import tarfile

    from tilegraph.tools import gpu_run

    monkeypatch.setattr(gpu_run, "on_gpu", lambda: True)  # only the environment part runs: no GPU needed
    assert gpu_run.main(["--out", str(tmp_path), "--only", "environment", "--budget-s", "120"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    (part,) = summary["parts"]
    assert part["part"] == "environment" and part["rc"] == 0
    assert part["result"]["versions"]["torch"] and "code_version" in part["result"]
    with tarfile.open(tmp_path / "gpu-run.tar.gz") as tar:
        assert {"summary.json", "environment.json", "logs/environment.log"} <= set(tar.getnames())


def test_bench_plan_writes_what_the_plan_benchmark_returns(tmp_path, monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("tilegraph.tools.bench.plan")

    def fake_main(argv):
        calls.append(argv)
        return [{"mix": mix, "batch_size": b, "plan_median_us": 10.0 * b} for mix in ("uniform", "skewed") for b in (1, 8)]

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "tilegraph.tools.bench.plan", fake)
    assert tilegraph_main(["bench", "plan", "--out", str(tmp_path), "--batch-sizes", "1,8"]) == 0
    assert calls == [["--batch-sizes", "1,8"]]
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["suite"] == "plan" and len(data["rows"]) == 4 and data["meta"]["device"]["type"] == "cpu"
    assert (tmp_path / "plan.png").exists() == HAS_MATPLOTLIB


def test_compile_check_receives_its_options_through_the_cli(capfd):
    """`python -m tilegraph compile-check --only ...`: the flags reach the check (argparse's REMAINDER
    would drop them and exit with a usage error)."""
    rc = tilegraph_main(["compile-check", "--only", "no-such-spec", "--cc", "90"])
    out = capfd.readouterr()
    assert "no spec matched --only 'no-such-spec'" in out.out + out.err, out
    assert rc == 2
