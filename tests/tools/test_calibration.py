"""Calibration: predicted vs measured side by side (the GPU-free parts) and its place in gpu-run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tilegraph.tools import calibration
from tilegraph.tools import perf_model as pm


def test_model_gpu_by_device_name() -> None:
    assert calibration.model_gpu("NVIDIA H200").name == "H200"
    assert calibration.model_gpu("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert calibration.model_gpu("NVIDIA A100-SXM4-80GB") is pm.H100_SXM


def test_measured_rows_are_tilegraph_at_the_largest_batch() -> None:
    rows = [
        {"impl": "tilegraph", "mix": "uniform", "batch_size": 8, "gbs": 900.0, "copy_fraction": 0.2},
        {"impl": "tilegraph", "mix": "uniform", "batch_size": 64, "gbs": 1200.0, "copy_fraction": 0.28},
        {"impl": "sdpa", "mix": "uniform", "batch_size": 128, "gbs": 2000.0, "copy_fraction": 0.5},
        {"impl": "tilegraph", "mix": "skewed", "batch_size": 64, "gbs": None},
    ]
    got = calibration.measured_decode({"rows": rows})
    assert [(r["mix"], r["batch_size"], r["gbs"]) for r in got] == [("uniform", 64, 1200.0)]
    assert calibration.measured_decode(None) == []


def test_side_by_side() -> None:
    memory = pm.predict_memory(pm.H200, 1, 128, 2, 0.41).as_json()
    record = {"spec": calibration.DECODE_SPEC, "cc": "sm_90", "registers": 128,
              "perf": {"predicted": {"H200": {"memory": memory}}}}  # fmt: skip
    measured = [{"mix": "uniform", "batch_size": 64, "gbs": 1158.6, "copy_fraction": 0.27}]
    got = calibration.side_by_side(record, pm.H200, 4300.0, measured)
    assert got["predicted"]["gbs"] == pytest.approx(772.389, rel=1e-5)
    assert got["predicted"]["fraction_of_measured_copy"] == pytest.approx(772.389 / 4300, rel=1e-5)
    assert got["measured"][0]["measured_over_predicted"] == pytest.approx(1158.6 / 772.389, rel=1e-5)
    assert calibration.side_by_side({**record, "perf": None}, pm.H200, None, [])["predicted"] is None


def test_gpu_run_has_a_calibration_part(tmp_path: Path) -> None:
    from tilegraph.tools.gpu_run import parts

    found = {p.name: p for p in parts(tmp_path, quick=True)}
    part = found["calibration"]
    assert "tilegraph.tools.calibration" in part.argv and part.result == "calibration.json"
    assert list(found).index("calibration") > list(found).index("ceilings")  # after what it compares with
