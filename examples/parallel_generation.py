"""Parallel generation: many requests sample continuations of one long prompt. Cascade attention reads
the prompt's KV once per step (level 0: one group holding every request) and each request's own
continuation once (level 1); flat decode reads the whole prompt again for every request.

    python examples/parallel_generation.py    # a GPU: 64 requests x 4k-token prompt; no GPU: tiny, simulated

Each step every request appends one token (random K/V: no model here) and both attentions run on
the same batch; the script checks they agree and prints KV bytes read and time per step.
"""

import time

import numpy as np
import torch

import tilegraph
from tilegraph.cascade import CascadeAttention, LevelTable

if tilegraph.SIMULATOR:
    device, num_requests, prompt_len, steps = "cpu", 6, 32, 3
    settings = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16",
                                  max_batch_size=8, max_num_pages=64, max_page_refs=128, max_num_tokens=8,
                                  num_ctas=2)  # fmt: skip
else:
    device, num_requests, prompt_len, steps = "cuda", 64, 4096, 8
    settings = tilegraph.Settings(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16",
                                  max_batch_size=64, max_num_pages=1024, max_page_refs=32768,
                                  max_num_tokens=64)  # fmt: skip
page_size = settings.page_size
assert prompt_len % page_size == 0, "the flat page tables append continuation pages right after the prompt's"

rng = np.random.default_rng(0)
prompt_pages = np.arange(prompt_len // page_size, dtype=np.int32)
max_new = steps + 4 * page_size  # room for each continuation: its own pages after the prompt's
pages_per_request = -(-max_new // page_size)
own_pages = (len(prompt_pages) + np.arange(num_requests * pages_per_request, dtype=np.int32)).reshape(num_requests, -1)
shape = (settings.max_num_pages, 2, page_size, settings.num_kv_heads, settings.head_dim)
kv_cache = torch.randn(shape, device=device).to(settings.torch_dtype)  # random K/V stand in for the model's
generated = rng.integers(1, 4 * page_size, num_requests)  # tokens sampled so far, per request


def tables(lengths: np.ndarray) -> tuple[list[LevelTable], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cascade levels and flat decode page tables for continuations of ``lengths`` tokens."""
    counts = -(-lengths // page_size)
    own = np.concatenate([own_pages[r, :c] for r, c in enumerate(counts)]).astype(np.int32)
    own_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    own_last = ((lengths - 1) % page_size + 1).astype(np.int32)
    rows = np.arange(num_requests + 1, dtype=np.int32)
    prompt = LevelTable(np.array([0, num_requests], np.int32), np.array([0, len(prompt_pages)], np.int32),
                        prompt_pages, np.array([page_size], np.int32))  # fmt: skip
    levels = [prompt, LevelTable(rows, own_indptr, own, own_last)]
    flat_indptr = np.concatenate([[0], np.cumsum(counts + len(prompt_pages))]).astype(np.int32)
    flat = np.concatenate([np.concatenate([prompt_pages, own_pages[r, :c]]) for r, c in enumerate(counts)]).astype(np.int32)
    return levels, (flat_indptr, flat, own_last)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB"


def timed(fn) -> tuple[torch.Tensor, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


cascade = CascadeAttention(settings, num_levels=2, device=device)
flat = tilegraph.BatchDecode(settings, device=device)
print(f"{num_requests} requests sampling from one {prompt_len}-token prompt"
      + (" (simulator: tiny sizes, times are not speeds)" if tilegraph.SIMULATOR else ""))  # fmt: skip
for step in range(steps + 1):
    generated += 1  # every request sampled one more token: its K/V is now in its own pages
    levels, flat_table = tables(generated)
    q = torch.randn(num_requests, settings.num_qo_heads, settings.head_dim, device=device).to(settings.torch_dtype)
    plan = cascade.plan(levels)
    flat.plan(*flat_table)
    out_cascade, cascade_s = timed(lambda: cascade.run(q, kv_cache))
    out_flat, flat_s = timed(lambda: flat.run(q, kv_cache))
    if step == 0:
        continue  # the first step compiles the kernels
    diff = (out_cascade.float() - out_flat.float()).abs().max().item() / out_flat.float().abs().max().item()
    print(f"step {step}: KV read cascade {mib(plan.kv_bytes(settings))} vs flat "
          f"{mib(plan.kv_bytes(settings, flat=True))}; time cascade {cascade_s * 1e3:8.2f} ms vs "
          f"flat {flat_s * 1e3:8.2f} ms; max relative difference {diff:.1e}")  # fmt: skip
