"""Performance budgets per kernel family (``perf_budgets.json``, next to this module) and their check.

A budget rule names a metric of a compile-check record (``metric``), a comparison and a value; a
record of the rule's family that misses it FAILs with a message naming the kernel and the rule. A
rule with ``expected_to_fail`` (today's kernel cannot meet it yet) reports XFAIL instead, and XPASS
once a kernel meets it (then the field should go).
"""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

BUDGETS_PATH = Path(__file__).with_name("perf_budgets.json")
OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}
PASS, FAIL, XFAIL, XPASS, UNKNOWN = "pass", "FAIL", "xfail", "XPASS", "unknown"


@dataclass(frozen=True)
class Rule:
    family: str
    name: str
    metric: str
    op: str
    value: float
    specs: str = ""  # only spec names containing this
    cc: str = ""  # only this compute capability
    expected_to_fail: str = ""

    @property
    def label(self) -> str:
        return f"{self.family}: {self.name} ({self.metric} {self.op} {self.value:g})"


def load(path: Path | None = None) -> list[Rule]:
    data = json.loads(Path(path or BUDGETS_PATH).read_text())
    rules = []
    for family, entries in data["families"].items():
        for entry in entries:
            if entry["op"] not in OPS:
                raise ValueError(f"{path or BUDGETS_PATH}: {family}/{entry.get('name')}: op {entry['op']!r} is not one of {list(OPS)}")
            rules.append(Rule(family=family, **entry))
    return rules


def metric(record: dict[str, Any], name: str) -> float | None:
    """A record's value for a budget metric (None: not known for this record)."""
    perf = record.get("perf") or {}
    kv = perf.get("kv_loop") or {}
    if name == "spill_bytes":
        stores, loads = record.get("spill_stores", -1), record.get("spill_loads", -1)
        return None if stores < 0 or loads < 0 else stores + loads
    if name in ("registers", "stack", "lmem", "smem"):
        value = record.get(name, -1)
        return None if value is None or value < 0 else value
    if name in ("instr_per_byte", "loads_in_flight"):
        return kv.get(name)
    if name.startswith("kv_loop."):
        return (kv.get("counts") or {}).get(name.removeprefix("kv_loop."))
    return (perf.get("counts") or {}).get(name)


def applies(rule: Rule, record: dict[str, Any]) -> bool:
    perf = record.get("perf") or {}
    return (
        perf.get("family") == rule.family
        and (not rule.specs or rule.specs in record["spec"])
        and (not rule.cc or rule.cc == record["cc"])
    )


@dataclass(frozen=True)
class Result:
    rule: str
    status: str
    value: float | None
    message: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def check(record: dict[str, Any], rules: list[Rule]) -> list[Result]:
    """Every rule that applies to ``record``, evaluated."""
    results = []
    where = f"{record['spec']} {record['cc']}"
    for rule in (r for r in rules if applies(r, record)):
        value = metric(record, rule.metric)
        if value is None:
            status = XFAIL if rule.expected_to_fail else UNKNOWN
            results.append(Result(rule.label, status, None, f"{where}: budget {rule.label}: {rule.metric} not known"))
            continue
        met = OPS[rule.op](value, rule.value)
        if rule.expected_to_fail:
            status = XPASS if met else XFAIL
        else:
            status = PASS if met else FAIL
        message = f"{where}: {'meets' if met else 'breaks'} budget {rule.label}: {rule.metric} = {value:g}"
        if status == XFAIL:
            message += f" (expected to fail: {rule.expected_to_fail})"
        elif status == XPASS:
            message += " (marked expected_to_fail: remove that field from perf_budgets.json)"
        results.append(Result(rule.label, status, value, message))
    return results


def spills_expected(results: list[dict[str, Any]]) -> bool:
    """True when a budget of the record says its spills are a known, expected failure (an
    ``expected_to_fail`` rule on ``spill_bytes``): the record's spills then do not fail the check."""
    return any(r["status"] == XFAIL and "(spill_bytes " in r["rule"] for r in results)


def failed(results: list[dict[str, Any]]) -> list[str]:
    """Messages of the results that fail a record (FAIL, or a metric that could not be read)."""
    return [r["message"] for r in results if r["status"] in (FAIL, UNKNOWN)]
