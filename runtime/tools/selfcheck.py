"""``python -m tilegraph selfcheck``: run each primitive and merge kernel once against numpy."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from tilegraph._device import SIMULATOR
from tilegraph.merge import merge_states


def _merge_check(device: str) -> tuple[str, bool, str]:
    v = torch.randn(3, 4, 2, 16).to(device)
    s = torch.randn(3, 4, 2).to(device)
    s[0, 1] = float("-inf")
    out, lse = merge_states(v, s)
    ref_lse = torch.logsumexp(s.double().cpu(), dim=1)
    weights = torch.exp(s.double().cpu() - ref_lse[:, None])
    ref = (weights[..., None] * v.double().cpu()).sum(1)
    err = max((out.double().cpu() - ref).abs().max().item(), (lse.double().cpu() - ref_lse).abs().max().item())
    return "merge_states", err < 1e-5, f"max abs error {err:.1e}"


def main() -> int:
    from tilegraph.kernels.selftest import run_selfcheck

    device = "cpu" if SIMULATOR else "cuda"
    results = [*run_selfcheck(device), _merge_check(device)]
    table = Table(title=f"tilegraph selfcheck on {'the simulator' if SIMULATOR else torch.cuda.get_device_name()}")
    for col in ("check", "ok", "detail"):
        table.add_column(col)
    for name, ok, detail in results:
        table.add_row(name, "[green]ok[/]" if ok else "[red]FAILED[/]", detail)
    Console().print(table)
    return 0 if all(ok for _, ok, _ in results) else 1
