"""``python -m tilegraph demo``: plan and run a skewed decode batch, check it, report balance and time.

On a GPU: a realistic shape (32 query / 8 KV heads, head_dim 128, bf16, one 32k-token request among
63 short ones). On a CPU-only machine: the same path at a tiny size on the numba CUDA simulator.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ._device import SIMULATOR
from .decode import BatchDecode
from .reference import decode_reference, relative_error
from .settings import Settings


def skewed_page_table(lengths: list[int], page_size: int, rng: np.random.Generator):
    """A page table for ``lengths`` with pages drawn at random from a pool (no page shared)."""
    pages_per_request = [-(-n // page_size) for n in lengths]
    pool = rng.permutation(sum(pages_per_request)).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(pages_per_request)]).astype(np.int32)
    kv_last_page_len = np.array([(n - 1) % page_size + 1 if n else 0 for n in lengths], dtype=np.int32)
    return kv_indptr, pool, kv_last_page_len


def main(argv: list[str] | None = None) -> int:
    console = Console()
    rng = np.random.default_rng()
    if SIMULATOR:
        settings = Settings(num_qo_heads=4, num_kv_heads=2, head_dim=32, page_size=4, dtype="float16",
                            max_batch_size=8, max_num_pages=64, num_ctas=4)  # fmt: skip
        lengths = [41, 3, 6, 1, 0, 9]
        device = "cpu"
    else:
        settings = Settings(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16",
                            max_batch_size=64, max_num_pages=8192)  # fmt: skip
        lengths = [32768] + rng.integers(64, 1024, 63).tolist()
        device = "cuda"
    where = "the numba CUDA simulator (CPU; for testing, not speed)" if SIMULATOR else torch.cuda.get_device_name()
    console.print(f"[bold]tilegraph demo[/] on {where}: skewed decode batch of {len(lengths)} requests")
    kv_indptr, kv_indices, kv_last = skewed_page_table(lengths, settings.page_size, rng)
    num_pages = max(int(kv_indices.max()) + 1 if len(kv_indices) else 1, 1)
    cache_shape = (num_pages, 2, settings.page_size, settings.num_kv_heads, settings.head_dim)
    kv_cache = torch.randn(cache_shape, dtype=torch.float32, device=device).to(settings.torch_dtype)
    q = torch.randn(len(lengths), settings.num_qo_heads, settings.head_dim, device=device).to(settings.torch_dtype)

    dec = BatchDecode(settings, device=device)
    t0 = time.perf_counter()
    plan = dec.plan(torch.from_numpy(kv_indptr), torch.from_numpy(kv_indices), torch.from_numpy(kv_last))
    plan_us = (time.perf_counter() - t0) * 1e6
    t0 = time.perf_counter()
    out, lse = dec.run(q, kv_cache, return_lse=True)
    if not SIMULATOR:
        torch.cuda.synchronize()
    first_run_s = time.perf_counter() - t0

    ref_out, ref_lse = decode_reference(q, kv_cache, settings, kv_indptr, kv_indices, kv_last)
    err_out = relative_error(out, ref_out)
    finite = torch.isfinite(ref_lse)
    err_lse = relative_error(lse.cpu()[finite], ref_lse[finite])
    tol = 2e-2 if settings.dtype == "bfloat16" else 5e-3

    table = Table(title="plan")
    for col in ("requests", "tiles", "split pairs", "CTAs", "balance", "plan µs"):
        table.add_column(col, justify="right")
    table.add_row(str(plan.batch_size), str(plan.num_tiles), str(plan.num_merges), str(plan.num_ctas),
                  f"{plan.balance:.3f}", f"{plan_us:.0f}")  # fmt: skip
    console.print(table)
    console.print(f"tiles per CTA: {plan.tiles_per_cta().tolist()}")
    console.print(f"first run (includes compilation): {first_run_s:.2f} s")
    if not SIMULATOR:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(20):
            start.record()
            dec.run(q, kv_cache, out=out)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3)
        console.print(f"decode run: median {np.median(times):.1f} µs over 20 runs")
    ok = err_out < tol and err_lse < 1e-3
    console.print(f"relative error vs float64 reference: out {err_out:.2e}, lse {err_lse:.2e} -> "
                  + ("[green]OK[/]" if ok else "[red]FAILED[/]"))  # fmt: skip
    return 0 if ok else 1
