"""Calibration of the static model on a lent GPU: predicted vs measured, side by side.

    python -m tilegraph.tools.calibration --gpu-run-dir DIR --json DIR/calibration.json

Runs compile-check (``--perf`` model) on this GPU's compute capability for the benchmark-shape
decode kernel (bf16, head_dim 128, group 4) and reads what gpu-run measured in DIR
(``ceilings.json``: the device-to-device copy; ``decode/decode.json``: tilegraph's decode GB/s per
length mix at its largest batch). The model GPU is the one of ``perf_model.GPUS`` whose name the
device's contains (H100 otherwise). The JSON (format: benchmarks/results/README.md) is what a
session keeps under benchmarks/results/calibration/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from . import perf_model as pm

DECODE_SPEC = "decode_pipeline[bfloat16,hd128,g4,default]"  # what BatchDecode launches


def model_gpu(device_name: str) -> pm.Gpu:
    for gpu in sorted(pm.GPUS, key=lambda g: -len(g.name)):
        if gpu.name.split()[0].lower() in device_name.lower():
            return gpu
    return pm.H100_SXM


def measured_decode(decode_json: dict[str, Any] | None) -> list[dict[str, Any]]:
    """tilegraph's rows of the decode bench at each mix's largest batch."""
    rows = [r for r in (decode_json or {}).get("rows", []) if r.get("impl") == "tilegraph" and r.get("gbs")]
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["mix"] not in best or r["batch_size"] > best[r["mix"]]["batch_size"]:
            best[r["mix"]] = r
    return [{k: r.get(k) for k in ("mix", "batch_size", "gbs", "copy_fraction", "median_us")} for r in best.values()]


def side_by_side(record: dict[str, Any], gpu: pm.Gpu, copy_gbs: float | None, measured: list[dict[str, Any]]) -> dict[str, Any]:
    """Predicted vs measured for one compile-check record (its model prediction for ``gpu``)."""
    predicted = (((record.get("perf") or {}).get("predicted") or {}).get(gpu.name) or {}).get("memory")
    out: dict[str, Any] = {"spec": record["spec"], "cc": record["cc"], "registers": record["registers"],
                           "predicted": None, "measured": measured}  # fmt: skip
    if predicted is None:
        return out
    gbs = predicted["predicted_bytes_per_s"] / 1e9
    out["predicted"] = {"gbs": gbs, "fraction_of_peak": predicted["fraction_of_peak"], "bound": predicted["bound"],
                        "fraction_of_measured_copy": gbs / copy_gbs if copy_gbs else None}  # fmt: skip
    for row in measured:
        row["measured_over_predicted"] = row["gbs"] / gbs if gbs else None
    return out


def calibrate(run_dir: Path) -> dict[str, Any]:
    import torch

    from . import compile_check
    from .bench.common import code_version

    name = torch.cuda.get_device_name()
    cc = torch.cuda.get_device_capability()
    gpu = model_gpu(name)
    ceilings = _read(run_dir / "ceilings.json")
    copy_gbs = ((ceilings or {}).get("copy") or {}).get("gbs")
    records = [r.as_json() for r in compile_check.run_check(("tilegraph.kernels.decode_pipeline",), (cc,), DECODE_SPEC)]
    measured = measured_decode(_read(run_dir / "decode" / "decode.json"))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": code_version(),
        "device": name,
        "cc": f"sm_{cc[0]}{cc[1]}",
        "model_gpu": gpu.__dict__,
        "measured_copy_gbs": copy_gbs,
        "kernels": [side_by_side(r, gpu, copy_gbs, measured) for r in records if r["spec"] == DECODE_SPEC],
    }


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tilegraph.tools.calibration", description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-run-dir", type=Path, required=True, help="the gpu-run output folder")
    parser.add_argument("--json", type=Path, required=True, help="where to write the calibration")
    args = parser.parse_args(argv)
    result = calibrate(args.gpu_run_dir)
    args.json.write_text(json.dumps(result, indent=1))
    for k in result["kernels"]:
        p = k["predicted"] or {}
        print(f"{k['spec']} on {result['device']}: predicted {p.get('gbs', float('nan')):.0f} GB/s "
              f"({p.get('bound')}); measured {[(m['mix'], round(m['gbs'])) for m in k['measured']]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
