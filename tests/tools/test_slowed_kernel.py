"""A deliberately slowed kernel moves the model's numbers the way the model says.

Three small streaming kernels (per token, a K and a V 16-byte load per thread), compiled for sm_90
by compile-check (driverless, in a subprocess without the simulator): the baseline issues both loads
together; ``dependent`` makes the V load's address depend on the K load's data (fewer loads in
flight -> Little's-law bandwidth falls in proportion); ``indexed`` adds a dependent index load per
token (more warp instructions per byte -> the issue ceiling falls in proportion).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tilegraph.tools import perf_model as pm

STREAM_MODULE = '''
from tilegraph._device import cuda
from tilegraph.kernels.compile_spec import CompileSpec, PerfHints
from tilegraph.kernels.primitives import load_16b

THREADS = 128
SIG = "void(int32[::1], int32[::1], int64, int32, int32[::1])"


def independent(words, index, n, mask, out):
    tid = cuda.threadIdx.x
    acc = 0
    for t in range(n):
        base = (t * THREADS + tid) * 8
        k = load_16b(words, base)
        v = load_16b(words, base + 4)
        acc += k[0] ^ k[1] ^ k[2] ^ k[3] ^ v[0] ^ v[1] ^ v[2] ^ v[3]
    out[tid] = acc


def dependent(words, index, n, mask, out):
    tid = cuda.threadIdx.x
    acc = 0
    for t in range(n):
        base = (t * THREADS + tid) * 8
        k = load_16b(words, base)
        v = load_16b(words, base + 4 + (k[0] & mask))  # mask is 0 at run time: same bytes, one more round trip
        acc += k[0] ^ k[1] ^ k[2] ^ k[3] ^ v[0] ^ v[1] ^ v[2] ^ v[3]
    out[tid] = acc


def indexed(words, index, n, mask, out):
    tid = cuda.threadIdx.x
    acc = 0
    for t in range(n):
        base = (index[t] * THREADS + tid) * 8  # the token's row through an index (a page table)
        k = load_16b(words, base)
        v = load_16b(words, base + 4)
        acc += k[0] ^ k[1] ^ k[2] ^ k[3] ^ v[0] ^ v[1] ^ v[2] ^ v[3]
    out[tid] = acc


def gpu_compile_specs():
    hints = PerfHints(threads=THREADS, ctas_per_sm=1, family="stream")  # one CTA per SM: latency-bound
    return [CompileSpec(f"stream[{f.__name__}]", f, SIG, ("ld.global.nc.v4.u32",), perf=hints)
            for f in (independent, dependent, indexed)]
'''


def _toolkit_missing() -> list[str]:
    missing = []
    for dist in ("nvidia-cuda-nvrtc", "nvidia-nvvm", "nvidia-nvjitlink", "nvidia-cuda-nvdisasm"):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    return missing


pytestmark = pytest.mark.skipif(bool(_toolkit_missing()), reason=f"CUDA 13 pip tools missing: {_toolkit_missing()}")


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("stream")
    (folder / "tg_stream_for_test.py").write_text(textwrap.dedent(STREAM_MODULE))
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM",)}
    env.update(TILEGRAPH_SIMULATOR="0", PYTHONPATH=os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")])))
    out = folder / "records.json"
    cmd = [sys.executable, "-m", "tilegraph.tools.compile_check", "--module", "tg_stream_for_test", "--cc", "90",
           "--json", str(out), "--perf"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "predicted" in proc.stdout
    return {r["spec"].split("[")[1].rstrip("]"): r for r in json.loads(Path(out).read_text())}


def _memory(record: dict[str, Any], gpu: str = "H100 SXM") -> dict[str, Any]:
    return record["perf"]["predicted"][gpu]["memory"]


def test_every_kernel_has_a_kv_loop_and_a_prediction(records: dict[str, dict[str, Any]]) -> None:
    for name, r in records.items():
        kv = r["perf"]["kv_loop"]
        assert kv is not None and kv["counts"]["LDG.E.128"] >= 2, name
        assert r["perf"]["occupancy"]["resident"] == 1, name
        for gpu in pm.GPUS:
            mem = _memory(r, gpu.name)
            again = pm.predict_memory(gpu, kv["loads_in_flight"], 128, 1, kv["instr_per_byte"])
            assert mem["predicted_bytes_per_s"] == pytest.approx(again.predicted_bytes_per_s), name


def test_a_dependent_load_lowers_what_is_in_flight(records: dict[str, dict[str, Any]]) -> None:
    fast, slow = records["independent"], records["dependent"]
    f_kv, s_kv = fast["perf"]["kv_loop"], slow["perf"]["kv_loop"]
    assert s_kv["loads_in_flight"] < f_kv["loads_in_flight"]
    f_mem, s_mem = _memory(fast), _memory(slow)
    assert f_mem["bound"].startswith("latency") and s_mem["bound"].startswith("latency")
    ratio = s_kv["loads_in_flight"] / f_kv["loads_in_flight"]
    assert s_mem["bytes_in_flight_per_sm"] == pytest.approx(f_mem["bytes_in_flight_per_sm"] * ratio)
    assert s_mem["predicted_bytes_per_s"] == pytest.approx(f_mem["predicted_bytes_per_s"] * ratio)
    assert s_mem["fraction_of_peak"] < f_mem["fraction_of_peak"]


def test_an_extra_index_load_costs_instructions_per_byte(records: dict[str, dict[str, Any]]) -> None:
    fast, slow = records["independent"], records["indexed"]
    f_kv, s_kv = fast["perf"]["kv_loop"], slow["perf"]["kv_loop"]
    assert s_kv["load_bytes_per_warp"] > s_kv["hbm_bytes_per_warp"]  # the index loads: counted as instructions, not bytes
    assert s_kv["hbm_bytes_per_warp"] == f_kv["hbm_bytes_per_warp"]
    assert s_kv["instr_per_byte"] > f_kv["instr_per_byte"]
    f_mem, s_mem = _memory(fast), _memory(slow)
    assert s_mem["issue_bytes_per_s"] == pytest.approx(f_mem["issue_bytes_per_s"] * f_kv["instr_per_byte"] / s_kv["instr_per_byte"])
    assert s_mem["predicted_bytes_per_s"] <= f_mem["predicted_bytes_per_s"]
