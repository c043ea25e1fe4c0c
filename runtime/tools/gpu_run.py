"""``python -m tilegraph gpu-run --out DIR``: everything a session with a lent GPU runs, in one call.

Parts, in order, each a time-boxed subprocess whose output goes to ``DIR/logs/<part>.log`` and
whose JSON lands under DIR as soon as it finishes (run it from the repository root: the test tier
is collected from there):

    environment   nvidia-smi, package versions, the device          -> environment.json
    ceilings      device-to-device copy GB/s, bf16 matmul TFLOP/s    -> ceilings.json
    demo          ``tilegraph demo`` (a skewed batch vs the float64 reference)
    profile       ``tilegraph.profile()`` over eager and graph-replayed decode steps -> profile.json
    pytest-gpu    ``python -m pytest -m gpu`` (the GPU test tier)   -> pytest-gpu.xml (+ summary)
    bench-SUITE   every GPU bench suite this checkout has (decode, graphs, merge, prefill,
                  cascade, hf), each told to stop 30 s before its box -> SUITE/SUITE.json, .png
    bench-decode-g8  both decode engines forced, Hq 64 / Hkv 8 (the tuning table's tensor-core
                  choice measured)                                  -> decode-g8/decode.json
    bench-plan    ``tilegraph bench plan`` (CPU)                       -> plan/plan.json, .png
    calibration   the static model's prediction for this GPU's decode specialization next to
                  the measured decode GB/s and copy bandwidth (tools/calibration.py) -> calibration.json

``DIR/summary.json`` is rewritten after every part (status, seconds, exit code, the part's JSON
inlined); at the end ``DIR/gpu-run.tar.gz`` bundles everything (one file to bring back). The whole
run fits in ``--budget-s`` (default 540 s): a part gets at most its own cap and never more than
what is left. On a machine where kernels run on the simulator it refuses (exit 3).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .bench.common import EXIT_NEEDS_GPU, EXIT_OK, code_version, needs_gpu_message, on_gpu, write_json


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float
    argv: list[str]
    result: str  # path under DIR of the JSON/XML the part writes ('' for none)
    budgeted: bool = False  # a bench suite: told to stop starting cases 30 s before its time box


def parts(out: Path, quick: bool) -> list[Part]:
    from .bench.cli import SUITES

    py = sys.executable
    smoke = ["--smoke"] if quick else []
    benches = [
        Part(f"bench-{suite}", cap_s, [py, "-m", "tilegraph", "bench", suite, "--out", str(out / suite), *smoke], f"{suite}/{suite}.json", True)
        for suite, cap_s in (("decode", 150), ("graphs", 90), ("merge", 60), ("prefill", 120), ("cascade", 90), ("hf", 90))
        if SUITES[suite].available
    ]  # fmt: skip
    # the decode engine choice measured at GQA group 8 (Hq 64 / Hkv 8), where the table picks tensor cores
    engines = ["--num-qo-heads", "64", "--num-kv-heads", "8", "--batch-sizes", "64", "--mixes", "uniform,skewed",
               "--peers", "tilegraph-cuda-cores,tilegraph-tensor-cores"]  # fmt: skip
    benches.insert(1, Part("bench-decode-g8", 60, [py, "-m", "tilegraph", "bench", "decode", "--out", str(out / "decode-g8"),
                                                   *engines, *smoke], "decode-g8/decode.json", True))  # fmt: skip
    return [
        Part("environment", 30, [py, "-m", "tilegraph.tools.gpu_run", "--environment-json", str(out / "environment.json")], "environment.json"),
        Part("ceilings", 45, [py, "-m", "tilegraph.tools.bench.common", "--json", str(out / "ceilings.json"), *smoke], "ceilings.json"),
        Part("demo", 60, [py, "-m", "tilegraph", "demo"], ""),
        Part("profile", 60, [py, "-m", "tilegraph.tools.gpu_run", "--profile-json", str(out / "profile.json")], "profile.json"),
        Part("pytest-gpu", 150, [py, "-m", "pytest", "-m", "gpu", "-q", "-x" if quick else "-rf",
                                 f"--junitxml={out / 'pytest-gpu.xml'}"], "pytest-gpu.xml"),  # fmt: skip
        *benches,
        Part("bench-plan", 30, [py, "-m", "tilegraph", "bench", "plan", "--out", str(out / "plan")], "plan/plan.json"),
        # the static model on this GPU's own specialization, next to what the parts above measured
        Part("calibration", 60, [py, "-m", "tilegraph.tools.calibration", "--gpu-run-dir", str(out),
                                 "--json", str(out / "calibration.json")], "calibration.json"),  # fmt: skip
    ]


def run_part(part: Part, out: Path, timeout_s: float) -> dict[str, Any]:
    """Run one part in its own process group, killed (the group) at ``timeout_s``."""
    log_path = out / "logs" / f"{part.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(part.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
    return {"part": part.name, "argv": part.argv, "rc": rc, "timed_out": timed_out, "timeout_s": round(timeout_s, 1),
            "seconds": round(time.perf_counter() - started, 2), "log": str(log_path.relative_to(out)),
            "result": _read_result(out / part.result) if part.result else None}  # fmt: skip


def _read_result(path: Path) -> Any:
    if not path.exists():
        return None
    if path.suffix == ".xml":
        return junit_summary(path)
    import json

    try:
        return json.loads(path.read_text())
    except ValueError as err:
        return {"unreadable": str(err)}


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and the failing tests' ids and messages from a pytest junit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {"unreadable": "no testsuite element"}
    failures = []
    for case in suite.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failures.append({"test": f"{case.get('classname')}::{case.get('name')}", "message": (bad.get("message") or "")[:500]})
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "failed": failures}


def environment() -> dict[str, Any]:
    """nvidia-smi, versions and the device, as plain data."""
    import torch

    from .bench.common import device_description, versions

    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as err:
        smi = f"nvidia-smi failed: {err}"
    device = torch.device("cuda") if on_gpu() else torch.device("cpu")
    return {"nvidia_smi": smi, "versions": versions(), "device": device_description(device),
            "code_version": code_version(), "executable": sys.executable}  # fmt: skip


def profile_decode_steps(json_path: Path, steps: int = 20, tiny: bool = False) -> dict[str, Any]:
    """``tilegraph.profile()`` around eager decode steps (log-normal lengths, B = max_batch_size), then
    around a GraphRunner's capture and replays of the same steps; writes both summaries as JSON.
    ``tiny``: simulator-sized Settings (checks the path, measures nothing)."""
    import numpy as np
    import torch

    import tilegraph

    from .bench.common import length_mix, page_table
    from tilegraph.profiling import profile

    if tiny:
        shape = dict(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16", max_batch_size=2, num_ctas=1)
        mix = dict(median_tokens=6, long_tokens=12)
    else:
        shape = dict(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16", max_batch_size=64)
        mix = dict(long_tokens=8192)
    batch, page_size = shape["max_batch_size"], shape["page_size"]
    max_pages = batch * -(-mix["long_tokens"] // page_size)
    settings = tilegraph.Settings(**shape, max_num_pages=max_pages, graphs={"batch_sizes": [batch]})
    device = torch.device("cpu" if tilegraph.SIMULATOR else "cuda")
    rng = np.random.default_rng(0)
    tables = [page_table(length_mix("lognormal", batch, rng, **mix), page_size, rng) for _ in range(steps)]
    cache = torch.randn((max_pages, 2, page_size, shape["num_kv_heads"], shape["head_dim"]), device=device).to(settings.torch_dtype)
    q = torch.randn((batch, shape["num_qo_heads"], shape["head_dim"]), device=device).to(settings.torch_dtype)
    out = torch.empty_like(q)
    dec = tilegraph.BatchDecode(settings, device=device)
    dec.plan(*tables[0])
    dec.run(q, cache, out=out)  # compiles outside the session
    with profile() as eager:
        for table in tables:
            dec.plan(*table)
            dec.run(q, cache, out=out)
    result: dict[str, Any] = {"settings": settings.model_dump(mode="json"), "steps": steps, "eager": eager.to_dict()}
    try:
        runner = tilegraph.GraphRunner(lambda inputs: dec.run(inputs["q"], cache), {"q": q}, attention=dec)
        with profile() as graphs:
            runner.capture_all(show_progress=False)
            for table in tables:
                runner.run({"q": q}, *table)
        result["graphs"] = graphs.to_dict()
    except Exception as err:  # the eager profile is still worth keeping
        result["graphs"] = {"error": f"{type(err).__name__}: {err}"}
    write_json(json_path, result)
    from rich.console import Console

    Console().print(eager.table())
    if "phases" in result["graphs"]:
        Console().print(graphs.table())
    return result


def bundle(out: Path) -> Path:
    tar_path = out / "gpu-run.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and path != tar_path and not path.name.endswith(".tmp"):
                tar.add(path, arcname=str(path.relative_to(out)))
    return tar_path


def run_all(out: Path, budget_s: float, quick: bool, only: list[str] | None) -> dict[str, Any]:
    deadline = time.perf_counter() + budget_s
    summary: dict[str, Any] = {"code_version": code_version(), "budget_s": budget_s, "parts": []}
    for part in parts(out, quick):
        if only and part.name not in only:
            continue
        left_s = deadline - time.perf_counter() - 5  # keep a few seconds for the bundle
        if left_s < 5:
            summary["parts"].append({"part": part.name, "skipped": "budget spent"})
            continue
        timeout_s = min(part.cap_s, left_s)
        if part.budgeted:
            part = replace(part, argv=[*part.argv, "--time-budget-s", f"{max(timeout_s - 30, 5):.0f}"])
        print(f"[gpu-run] {part.name} (up to {timeout_s:.0f} s)", flush=True)
        result = run_part(part, out, timeout_s)
        status = "timed out" if result["timed_out"] else f"rc {result['rc']}"
        print(f"[gpu-run] {part.name}: {status} in {result['seconds']:.1f} s", flush=True)
        if result["rc"] != 0:
            tail = (out / result["log"]).read_text()[-2000:]
            print(tail, flush=True)
        summary["parts"].append(result)
        write_json(out / "summary.json", summary)
    summary["ok"] = all(p.get("rc") == 0 for p in summary["parts"])
    write_json(out / "summary.json", summary)
    summary["bundle"] = str(bundle(out))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tilegraph gpu-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-run"), help="output folder (default ./gpu-run)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget for all parts (default 540)")
    parser.add_argument("--quick", action="store_true", help="ceilings and benches in --smoke size, pytest stops at the first failure")
    parser.add_argument("--only", type=lambda t: [v for v in t.split(",") if v], default=None, help="comma-separated part names")
    parser.add_argument("--environment-json", type=Path, help=argparse.SUPPRESS)  # the environment part itself
    parser.add_argument("--profile-json", type=Path, help=argparse.SUPPRESS)  # the profile part itself
    args = parser.parse_args(argv)
    if args.environment_json is not None:
        write_json(args.environment_json, environment())
        return EXIT_OK
    if args.profile_json is not None:
        profile_decode_steps(args.profile_json, tiny=not on_gpu())
        return EXIT_OK
    if not on_gpu():
        print(needs_gpu_message("gpu-run"), file=sys.stderr)
        return EXIT_NEEDS_GPU
    args.out.mkdir(parents=True, exist_ok=True)
    summary = run_all(args.out.resolve(), args.budget_s, args.quick, args.only)
    print(f"[gpu-run] {'all parts passed' if summary['ok'] else 'some parts failed'}; summary: {args.out / 'summary.json'}")
    return EXIT_OK if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
