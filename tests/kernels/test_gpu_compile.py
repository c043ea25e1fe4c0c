"""The driverless GPU compile check, run as a subprocess without the simulator.

Every spec of every module in ``KERNEL_MODULES`` must compile for sm_80 and sm_90, contain its
expected PTX instructions and their SASS forms (nvdisasm from the test extra), spill nothing and
keep its family's performance budgets. The default tier compiles every spec for sm_90 (where the
performance budgets live) and each module's representative spec for sm_80 (``--sample-cc 80``),
in one run that also writes the predicted-performance table; its output is copied to
``<tempdir>/tilegraph-compile-check.txt`` for CI to print. The slow tier compiles the rest of the
sm_80 set, one module per test.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tilegraph.tools import budgets, compile_check

TOOLKIT = ("nvidia-cuda-nvrtc", "nvidia-nvvm", "nvidia-nvjitlink", "nvidia-cuda-nvdisasm")
REPORT_COPY = Path(tempfile.gettempdir()) / "tilegraph-compile-check.txt"


def _missing_toolkit() -> list[str]:
    missing = []
    for dist in TOOLKIT:
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    return missing


pytestmark = pytest.mark.skipif(
    bool(_missing_toolkit()),
    reason=f"CUDA 13 pip toolkit missing ({', '.join(_missing_toolkit())}): install numba-cuda[cu13]",
)


def _run_check(*args: str, pythonpath: Path | None = None, timeout_s: float = 600, **env_extra: str | None) -> tuple[int, str]:
    """Run the check in a fresh process; ``env_extra`` overrides the environment (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "TILEGRAPH_SIMULATOR")}
    env.update({"TILEGRAPH_SIMULATOR": "0", **env_extra})
    env = {k: v for k, v in env.items() if v is not None}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "tilegraph.tools.compile_check", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, list[dict[str, Any]], dict[str, Any]]:
    folder = tmp_path_factory.mktemp("compile_check")
    path, perf_path = folder / "records.json", folder / "perf.json"
    # a hang guard, not a speed limit: ~130 compiles take minutes on a loaded 2-core machine
    args = ("--json", str(path), "--cc", "80,90", "--sample-cc", "80", "--perf-json", str(perf_path))
    rc, output = _run_check(*args, timeout_s=2400)
    REPORT_COPY.write_text(output)
    records = json.loads(path.read_text()) if path.exists() else []
    perf = json.loads(perf_path.read_text()) if perf_path.exists() else {}
    return rc, output, records, perf


def _module_specs(module: str) -> list[str]:
    return [spec.name for spec in importlib.import_module(module).gpu_compile_specs()]


def _assert_records_pass(rc: int, output: str, records: list[dict[str, Any]]) -> None:
    for r in records:
        where = f"{r['spec']} {r['cc']}"
        assert r["compiled"], f"{where}: {r['error']}"
        assert all(r["expect"].values()), f"{where}: PTX lacks {[k for k, v in r['expect'].items() if not v]}"
        spills = (r["spill_stores"], r["spill_loads"])
        # spills fail unless the family's budgets mark them expected (prefill_mma on sm_80, perf_budgets.json)
        assert spills == (0, 0) or budgets.spills_expected(r["budget"]), f"{where}: spill stores/loads {spills}"
        assert r["registers"] > 0, where
        assert r["sass"] is not None and r["perf"] is not None, f"{where}: no SASS ({r['error']})"
        lacking = [k for k, v in r["sass"].items() if not v]
        assert not lacking, f"{where}: SASS lacks the form of {lacking}"
        broken = [b["message"] for b in r["budget"] if b["status"] in ("FAIL", "unknown")]
        assert not broken, "\n".join(broken)
        assert r["ok"], where
    assert rc == 0, output


def test_every_spec_compiles_for_sm90_and_each_family_for_sm80(full_run: tuple[int, str, list[dict[str, Any]], dict[str, Any]]) -> None:
    """One test on the one run (module-scoped fixtures run once per xdist worker): every spec at
    sm_90, each module's first spec at sm_80; then the predictions (_assert_predictions)."""
    rc, output, records, perf = full_run
    expected = set()
    for module in compile_check.KERNEL_MODULES:
        names = _module_specs(module)
        expected |= {(name, "sm_90") for name in names} | {(names[0], "sm_80")}
    assert {(r["spec"], r["cc"]) for r in records} == expected, output
    _assert_records_pass(rc, output, records)
    _assert_predictions(output, records, perf)


@pytest.mark.slow
@pytest.mark.parametrize("module", compile_check.KERNEL_MODULES)
def test_every_spec_compiles_for_sm80(module: str, tmp_path: Path) -> None:
    """The sm_80 specs the default tier's sample leaves out, one module per test."""
    path = tmp_path / "records.json"
    rc, output = _run_check("--json", str(path), "--cc", "80", "--module", module, timeout_s=1200)
    records = json.loads(path.read_text()) if path.exists() else []
    assert {(r["spec"], r["cc"]) for r in records} == {(name, "sm_80") for name in _module_specs(module)}, output
    _assert_records_pass(rc, output, records)


def test_sample_cc_keeps_each_modules_first_spec(tmp_path: Path) -> None:
    path = tmp_path / "records.json"
    rc, output = _run_check("--json", str(path), "--cc", "80,90", "--sample-cc", "80", "--only", "selftest.row8")
    got = {(r["spec"], r["cc"]) for r in json.loads(path.read_text())}
    names = [n for n in _module_specs("tilegraph.kernels.selftest") if "selftest.row8" in n]
    assert len(names) >= 2 and rc == 0, output
    assert got == {(n, "sm_90") for n in names} | {(names[0], "sm_80")}, output


def _assert_predictions(output: str, records: list[dict[str, Any]], perf: dict[str, Any]) -> None:
    """sm_90 decode and prefill: a K/V loop in the SASS, occupancy, a predicted % of peak on both GPUs;
    the benchmark shapes are in the covering set; the step model gives the skewed batch a number."""
    assert "predicted" in output and "H100 SXM" in output and "H200" in output
    rows = {r["spec"]: r for r in perf["rows"]}
    for r in records:
        family = (r["perf"] or {}).get("family")
        if r["cc"] != "sm_90" or family not in ("decode", "prefill"):
            continue
        assert r["perf"]["kv_loop"] is not None and r["perf"]["kv_loop"]["loads_in_flight"] >= 1, r["spec"]
        assert r["perf"]["occupancy"]["resident"] >= 1, r["spec"]
        for gpu in ("H100 SXM", "H200"):
            assert 0 < rows[r["spec"]]["predicted"][gpu]["fraction_of_peak"] <= 1, (r["spec"], gpu)
    assert "decode[bfloat16,hd128,g4,default]" in rows
    assert "prefill[bfloat16,hd128,g4,paged,causal,default]" in rows
    for gpu, step in perf["step"]["gpus"].items():
        assert step["step_s"] > step["decode_s"] > 0 and step["plan"]["num_merges"] > 0, gpu
    statuses = {b["rule"]: b["counts"] for b in perf["budgets"]}
    assert any(rule.startswith("decode: K/V by cp.async") for rule in statuses), statuses
    assert "budget decode:" in output


BUDGET_MODULE = '''
from tilegraph._device import cuda
from tilegraph.kernels.compile_spec import CompileSpec, PerfHints
from tilegraph.kernels.primitives import ex2


def ex2_kernel(x, out):
    i = cuda.grid(1)
    out[i] = ex2(x[i])


def gpu_compile_specs():
    hints = PerfHints(threads=128, family="tiny")
    return [CompileSpec("tiny[ex2]", ex2_kernel, "void(float32[::1], float32[::1])", ("ex2.approx.ftz.f32",), perf=hints)]
'''


def test_a_broken_budget_fails_the_check_naming_kernel_and_budget(tmp_path: Path) -> None:
    (tmp_path / "tg_budget_for_test.py").write_text(textwrap.dedent(BUDGET_MODULE))
    rules = {"families": {"tiny": [
        {"name": "registers", "metric": "registers", "op": "<=", "value": 1},
        {"name": "tensor cores", "metric": "HMMA", "op": ">=", "value": 1, "expected_to_fail": "no mma here"},
    ]}}  # fmt: skip
    budget_file = tmp_path / "budgets.json"
    budget_file.write_text(json.dumps(rules))
    args = ("--module", "tg_budget_for_test", "--cc", "90", "--budgets", str(budget_file), "--perf")
    rc, output = _run_check(*args, pythonpath=tmp_path)
    assert rc == 1, output
    assert "tiny[ex2] sm_90: breaks budget tiny: registers (registers <= 1)" in output
    assert "budget tiny: tensor cores (HMMA >= 1): xfail 1" in output
    rules["families"]["tiny"] = rules["families"]["tiny"][1:]
    budget_file.write_text(json.dumps(rules))
    rc, output = _run_check(*args, pythonpath=tmp_path)
    assert rc == 0 and "xfail 1" in output, output


BAD_MODULE = '''
from tilegraph._device import cuda
from tilegraph.kernels.compile_spec import CompileSpec
from tilegraph.kernels.primitives import ex2


def ex2_kernel(x, out):
    i = cuda.grid(1)
    out[i] = ex2(x[i])


def gpu_compile_specs():
    sig = "void(float32[::1], float32[::1])"
    return [
        CompileSpec("bad.good", ex2_kernel, sig, ("ex2.approx.ftz.f32",)),
        CompileSpec("bad.missing", ex2_kernel, sig, ("ex2.approx.ftz.f32", "shfl.sync.bfly")),
        CompileSpec("bad.typing", ex2_kernel, "void(int32, float32[::1])", ()),
    ]
'''


def test_check_fails_on_bad_specs(tmp_path: Path) -> None:
    (tmp_path / "tg_bad_specs_for_test.py").write_text(textwrap.dedent(BAD_MODULE))
    json_path = tmp_path / "bad.json"
    args = ("--module", "tg_bad_specs_for_test", "--cc", "90", "--json", str(json_path))
    rc, output = _run_check(*args, pythonpath=tmp_path)
    assert rc == 1, output
    records = {r["spec"]: r for r in json.loads(json_path.read_text())}
    assert records["bad.good"]["ok"] and records["bad.good"]["registers"] > 0
    assert records["bad.missing"]["compiled"] and not records["bad.missing"]["ok"]
    assert records["bad.missing"]["expect"] == {"ex2.approx.ftz.f32": True, "shfl.sync.bfly": False}
    assert not records["bad.typing"]["compiled"] and records["bad.typing"]["error"]
    assert "missing: shfl.sync.bfly" in output


def test_only_filter_without_match_fails(tmp_path: Path) -> None:
    rc, output = _run_check("--only", "no-such-kernel-xyz")
    assert rc == 2 and "no spec matched" in output


def test_leaves_an_automatic_simulator() -> None:
    """Without TILEGRAPH_SIMULATOR, ``python -m`` imports tilegraph first (simulator on a CPU machine): it re-runs."""
    rc, output = _run_check("--only", "selftest.ex2", "--cc", "90", TILEGRAPH_SIMULATOR=None)
    assert rc == 0 and "1 passed, 0 failed" in output, output


def test_refuses_to_run_on_the_simulator() -> None:
    rc, output = _run_check("--cc", "90", TILEGRAPH_SIMULATOR="1", NUMBA_ENABLE_CUDASIM="1")
    assert rc != 0 and "simulator is on" in output


LOG = """ptxas info    : Used 40 registers, used 1 barriers
ptxas         .     24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
info    : used 40 registers, used 2 barriers, 24 stack, 0 bytes smem, 400 bytes cmem[0], 24 bytes lmem
"""


def test_parse_resources() -> None:
    got = compile_check.parse_resources(LOG)
    assert got == {"registers": 40, "spill_stores": 16, "spill_loads": 8, "stack": 24, "lmem": 24, "smem": 0}
    assert compile_check.parse_resources("nothing here")["spill_stores"] == -1


def test_record_ok_needs_no_spills_and_every_expectation() -> None:
    rec = compile_check.Record("m", "s", "sm_90", compiled=True, registers=10, spill_stores=0, spill_loads=0)
    rec.expect = {"ex2.approx": True}
    assert rec.ok
    rec.spill_loads = 4
    assert not rec.ok
    rec.spill_loads, rec.sass = 0, {"ex2.approx": False}
    assert not rec.ok
