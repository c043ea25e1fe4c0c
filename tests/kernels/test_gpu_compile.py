"""The driverless GPU compile check, run as a subprocess without the simulator.

Every spec of every module in ``KERNEL_MODULES`` must compile for sm_80 and sm_90, contain its
expected PTX instructions (and their SASS forms, when nvdisasm is installed) and spill nothing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tilegraph.tools import compile_check

TOOLKIT = ("nvidia-cuda-nvrtc", "nvidia-nvvm", "nvidia-nvjitlink")
CCS = ("sm_80", "sm_90")


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


def _run_check(*args: str, pythonpath: Path | None = None, **env_extra: str | None) -> tuple[int, str]:
    """Run the check in a fresh process; ``env_extra`` overrides the environment (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "TILEGRAPH_SIMULATOR")}
    env.update({"TILEGRAPH_SIMULATOR": "0", **env_extra})
    env = {k: v for k, v in env.items() if v is not None}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "tilegraph.tools.compile_check", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def check_records(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, list[dict[str, Any]]]:
    path = tmp_path_factory.mktemp("compile_check") / "records.json"
    rc, output = _run_check("--json", str(path), "--cc", "80,90")
    records = json.loads(path.read_text()) if path.exists() else []
    return rc, output, records


def test_every_spec_compiles_for_each_cc(check_records: tuple[int, str, list[dict[str, Any]]]) -> None:
    rc, output, records = check_records
    expected = {
        (spec.name, cc)
        for module in compile_check.KERNEL_MODULES
        for spec in importlib.import_module(module).gpu_compile_specs()
        for cc in CCS
    }
    assert {(r["spec"], r["cc"]) for r in records} == expected, output
    for r in records:
        where = f"{r['spec']} {r['cc']}"
        assert r["compiled"], f"{where}: {r['error']}"
        assert all(r["expect"].values()), f"{where}: PTX lacks {[k for k, v in r['expect'].items() if not v]}"
        spills = (r["spill_stores"], r["spill_loads"])
        assert spills == (0, 0), f"{where}: spill stores/loads {spills}"
        assert r["registers"] > 0, where
        if r["sass"] is not None:
            lacking = [k for k, v in r["sass"].items() if not v]
            assert not lacking, f"{where}: SASS lacks the form of {lacking}"
        assert r["ok"], where
    assert rc == 0, output


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
    assert got == {"registers": 40, "spill_stores": 16, "spill_loads": 8, "stack": 24, "lmem": 24}
    assert compile_check.parse_resources("nothing here")["spill_stores"] == -1


def test_record_ok_needs_no_spills_and_every_expectation() -> None:
    rec = compile_check.Record("m", "s", "sm_90", compiled=True, registers=10, spill_stores=0, spill_loads=0)
    rec.expect = {"ex2.approx": True}
    assert rec.ok
    rec.spill_loads = 4
    assert not rec.ok
    rec.spill_loads, rec.sass = 0, {"ex2.approx": False}
    assert not rec.ok
