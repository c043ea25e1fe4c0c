"""``compile-check --perf``: the predicted-performance table, the budget summary, the decode step model.

Reads compile-check records (plain dicts, ``Record.as_json()``) only: ``report`` builds the JSON
(rows + budgets + step model), ``render`` prints it with rich. Every number is a prediction of the
static model (docs/perf-model.md), never a measurement.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from . import perf_model as pm
from .kernel_profile import MODEL_CC

BENCH_DECODE = "decode_pipeline[bfloat16,hd128,g4,default]"  # what BatchDecode launches
BENCH_MERGE = "partial_merge[bfloat16]"
HEADLINE = "predicted by the static model from sm_90 SASS (docs/perf-model.md); nothing here ran on a GPU"


def row(record: dict[str, Any]) -> dict[str, Any] | None:
    """One table row for a record with a model prediction (sm_90, threads known)."""
    perf = record.get("perf") or {}
    if record["cc"] != MODEL_CC or not perf.get("predicted"):
        return None
    kv, occ = perf.get("kv_loop") or {}, perf["occupancy"]
    out: dict[str, Any] = {
        "spec": record["spec"], "family": perf["family"], "registers": record["registers"],
        "resident_ctas": occ["resident"], "limiter": occ["limiter"],
        "loads_in_flight": kv.get("loads_in_flight"), "instr_per_byte": kv.get("instr_per_byte"),
        "kb_in_flight_per_sm": None, "predicted": {},
    }  # fmt: skip
    for gpu, entry in perf["predicted"].items():
        mem, comp = entry.get("memory"), entry.get("compute")
        if mem is not None:
            out["kb_in_flight_per_sm"] = mem["bytes_in_flight_per_sm"] / 1024
        if entry["bound"] == "compute" and comp is not None:
            out["predicted"][gpu] = {"fraction_of_peak": comp["fraction_of_peak"], "of": "dense tensor-core FLOP/s",
                                     "flop_per_s": comp["predicted_flop_per_s"], "unit": comp["unit"]}  # fmt: skip
        elif mem is not None:
            out["predicted"][gpu] = {"fraction_of_peak": mem["fraction_of_peak"], "of": "HBM bandwidth",
                                     "bytes_per_s": mem["predicted_bytes_per_s"], "bound": mem["bound"]}  # fmt: skip
    return out


def budget_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget rule: how many records pass / fail / xfail / xpass, and the values seen."""
    by_rule: dict[str, dict[str, Any]] = defaultdict(lambda: {"counts": defaultdict(int), "values": [], "example": ""})
    for record in records:
        for result in record.get("budget", []):
            entry = by_rule[result["rule"]]
            entry["counts"][result["status"]] += 1
            if result["value"] is not None:
                entry["values"].append(result["value"])
            if result["status"] != "pass" and not entry["example"]:
                entry["example"] = result["message"]
    return [{"rule": rule, "counts": dict(e["counts"]), "min": min(e["values"], default=None),
             "max": max(e["values"], default=None), "example": e["example"]} for rule, e in by_rule.items()]  # fmt: skip


def report(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The --perf JSON: rows, budgets and the decode step model on the skewed batch."""
    rows = [r for r in map(row, records) if r is not None]
    out: dict[str, Any] = {"headline": HEADLINE, "gpus": [g.__dict__ for g in pm.GPUS], "rows": rows,
                           "budgets": budget_summary(records), "step": None}  # fmt: skip
    by_name = {(r["spec"], r["cc"]): r for r in records}
    decode = by_name.get((BENCH_DECODE, MODEL_CC))
    if decode is not None and (decode.get("perf") or {}).get("predicted"):
        from .step_model import skewed_step

        out["step"] = skewed_step(decode, by_name.get((BENCH_MERGE, MODEL_CC)))
    return out


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(data: dict[str, Any], console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    names = [g["name"] for g in data["gpus"]]
    table = Table(title=f"Predicted performance ({data['headline']})", title_justify="left")
    for col in ("kernel", "regs", "occupancy", "KB in flight/SM", "instr/B", *(f"predicted % {n}" for n in names)):
        table.add_column(col, no_wrap=True)
    for r in data["rows"]:
        cells = []
        for name in names:
            p = r["predicted"].get(name)
            if p is None:
                cells.append("-")
            elif "flop_per_s" in p:
                cells.append(f"{100 * p['fraction_of_peak']:.2f}% ({p['flop_per_s'] / 1e12:.1f} TFLOP/s)")
            else:
                cells.append(f"{100 * p['fraction_of_peak']:.0f}% ({p['bytes_per_s'] / 1e9:.0f} GB/s)")
        table.add_row(escape(r["spec"]), str(r["registers"]), f"{r['resident_ctas']} CTAs ({r['limiter']})",
                      _f(r["kb_in_flight_per_sm"], ".1f"), _f(r["instr_per_byte"], ".3f"), *cells)  # fmt: skip
    console.print(table)
    for b in data["budgets"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(b["counts"].items()))
        seen = "" if b["min"] is None else f"; seen {b['min']:g}..{b['max']:g}"
        line = f"budget {b['rule']}: {counts}{seen}"
        console.print(escape(line), soft_wrap=True, highlight=False)
        if b["example"] and ("FAIL" in b["counts"] or "XPASS" in b["counts"] or "unknown" in b["counts"]):
            console.print(escape(f"  e.g. {b['example']}"), soft_wrap=True, highlight=False)
    step = data.get("step")
    if step:
        for gpu, s in step["gpus"].items():
            console.print(escape(
                f"predicted decode step, {step['batch']} ({gpu}, {s['plan']['num_ctas']} CTAs): {s['step_s'] * 1e6:.1f} us = "
                f"decode {s['decode_s'] * 1e6:.1f} us (makespan {s['plan']['makespan']} units) + merge {s['merge_s'] * 1e6:.1f} us "
                f"({s['plan']['num_merges']} merges, {s['merge_bytes'] / 1e3:.0f} KB) + {s['launches']} launches x "
                f"{pm.LAUNCH_OVERHEAD_S * 1e6:.0f} us; split-merge cost {s['split_merge_s'] * 1e6:.1f} us; "
                f"balanced without merge {s['balanced_s'] * 1e6:.1f} us"), soft_wrap=True, highlight=False)  # fmt: skip
