"""Where kernels run: the simulator is turned on at import when there is no GPU, with its fixes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tilegraph
from tilegraph import _device

pytestmark = pytest.mark.skipif(not tilegraph.SIMULATOR, reason="simulator policy (CPU-only machines)")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "TILEGRAPH_SIMULATOR")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_import_turns_the_simulator_on_with_its_fixes():
    result = _python(
        "import os, tilegraph\n"
        "from numba.cuda.simulator import kernelapi\n"
        "print(tilegraph.SIMULATOR, os.environ['NUMBA_ENABLE_CUDASIM'], kernelapi.FakeCUDAShared._tilegraph_locked)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "1", "True"]


def test_cpu_device_after_numba_cuda_was_imported_without_the_simulator_says_what_to_do():
    result = _python(
        "import numba.cuda, tilegraph\n"
        "try:\n"
        "    tilegraph.BatchDecode(tilegraph.Settings(num_qo_heads=1, num_kv_heads=1, head_dim=16), device='cpu')\n"
        "except tilegraph.DeviceError as e:\n"
        "    print('DeviceError:', e)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "DeviceError:" in result.stdout and "Import tilegraph before numba.cuda" in result.stdout


def test_cuda_device_on_the_simulator_is_refused():
    with pytest.raises(tilegraph.DeviceError, match="device='cpu'"):
        _device.resolve_device("cuda")
    assert _device.resolve_device(None).type == "cpu"


def test_simulated_launches_run_with_a_fast_switch_interval():
    before = sys.getswitchinterval()
    with _device.simulating():
        assert sys.getswitchinterval() == pytest.approx(1e-4)
    assert sys.getswitchinterval() == before
