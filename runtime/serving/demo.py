"""``python -m tilegraph demo``: a Llama-style decoder serving requests by continuous batching,
eagerly and under CUDA graphs, with the checks that say both compute the same thing.

On a GPU: a Llama-3.2-1B-shaped model (16 layers, hidden 2048, 32/8 heads, bf16, random weights),
48 requests whose prompts run from 1 to ~800 tokens; inter-token latency eager vs graphs. On a
CPU-only machine: a 2-layer model at a tiny size on the numba CUDA simulator, the graphs through the
graph stand-in (the simulator is for correctness, not speed). Either way it checks that

  * the greedy tokens of the graph loop equal those of its bit-exact eager twin (``eager_padded``,
    eager on the bucket's rows) -- exit 1 if not;
  * layer 0's paged attention of one step matches a float64 reference on the gathered cache;
  * it reports how many tokens of plain eager (B rows, other matmul shapes) agree.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tilegraph._device import SIMULATOR
from .llama import LlamaConfig, LlamaDecoder
from tilegraph.page_pool import PagePool
from .loop import MODES, DecodeRunner, LoopResult, Request, attention_error, serve
from tilegraph.settings import Settings

LOOP_ORDER = ("eager_padded", "graphs", "eager")  # the first loop also pays kernel compilation
GPU_PADDED_STEPS = 150  # on a GPU the bit-exact twin runs this many steps (its tokens are a prefix)


def tiny_setup(seed: int) -> tuple[LlamaConfig, Settings, list[Request]]:
    config = LlamaConfig.tiny(seed=seed)
    settings = config.attention_settings(page_size=4, max_batch_size=6, max_num_pages=12, num_ctas=4,
                                         graphs={"batch_sizes": [1, 2, 4]})  # fmt: skip
    rng = np.random.default_rng(seed)
    # (prompt length, new tokens, arrival step): tiny to "long" (4 pages), joining at steps 0-3
    shapes = [(12, 3, 0), (1, 3, 0), (5, 2, 1), (2, 4, 2), (1, 2, 2), (2, 1, 3), (3, 3, 3)]
    requests = [Request(i, tuple(rng.integers(0, config.vocab_size, p).tolist()), n, a) for i, (p, n, a) in enumerate(shapes)]
    return config, settings, requests


def gpu_setup(seed: int, num_requests: int) -> tuple[LlamaConfig, Settings, list[Request]]:
    config = LlamaConfig(seed=seed)
    settings = config.attention_settings(page_size=16, max_batch_size=64, max_num_pages=4096)
    rng = np.random.default_rng(seed)
    prompt_lens = np.exp(rng.uniform(0, np.log(512), num_requests)).astype(int)  # log-uniform 1..511
    new_tokens = rng.integers(8, 97, num_requests)
    arrivals = np.sort(rng.integers(0, 128, num_requests))
    requests = [Request(i, tuple(rng.integers(0, config.vocab_size, p).tolist()), int(n), int(a))
                for i, (p, n, a) in enumerate(zip(prompt_lens, new_tokens, arrivals))]  # fmt: skip
    return config, settings, requests


def run_loop(model: LlamaDecoder, settings: Settings, requests: list[Request], mode: str,
             max_steps: int | None = None) -> tuple[LoopResult, dict]:  # fmt: skip
    start = time.perf_counter()
    runner = DecodeRunner(model, settings, mode=mode, show_progress=not SIMULATOR)  # type: ignore[arg-type]
    setup_s = time.perf_counter() - start
    pool = PagePool(settings)
    result = serve(runner, requests, pool, max_steps=max_steps)
    if max_steps is None and pool.num_free_pages != settings.max_num_pages:
        raise RuntimeError(f"{mode}: {settings.max_num_pages - pool.num_free_pages} pages were not freed")
    stats = {"setup_s": setup_s}
    if runner.graphs is not None:
        stats.update(replays=runner.graphs.stats.replays, eager_steps=runner.graphs.stats.eager_steps)
    return result, stats


def check_attention(model: LlamaDecoder, settings: Settings, requests: list[Request], steps: int) -> float | None:
    """Serve ``steps`` steps eagerly, then compare one more step's layer-0 attention with float64
    (None: no request was live then)."""
    runner = DecodeRunner(model, settings, mode="eager")
    pool = PagePool(settings)
    serve(runner, requests, pool, max_steps=steps)
    if not pool.request_ids:
        return None
    return attention_error(runner, pool, [0] * len(pool.request_ids))


def token_agreement(a: dict[int, list[int]], b: dict[int, list[int]]) -> tuple[int, int]:
    """(tokens equal, tokens compared), per request up to the first difference (after it the two
    loops feed different tokens and are no longer comparable)."""
    same = total = 0
    for rid, tokens in a.items():
        other = b[rid]
        total += len(tokens)
        for x, y in zip(tokens, other):
            if x != y:
                break
            same += 1
    return same, total


def is_prefix(partial: dict[int, list[int]], full: dict[int, list[int]]) -> bool:
    """Every request's tokens in ``partial`` (a loop cut short) begin ``full``'s."""
    return all(full[rid][: len(tokens)] == tokens for rid, tokens in partial.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tilegraph demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=48, help="number of requests (GPU size only)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model even on a GPU")
    args = parser.parse_args(list(argv) if argv is not None else [])
    console = Console()
    tiny = SIMULATOR or args.tiny
    config, settings, requests = tiny_setup(args.seed) if tiny else gpu_setup(args.seed, args.requests)
    device = torch.device("cpu" if SIMULATOR else "cuda")
    if SIMULATOR:
        where = "the numba CUDA simulator (CPU; for correctness, not speed), graphs through the graph stand-in"
    else:
        where = f"{torch.cuda.get_device_name(device)}, real CUDA graphs"
    size = (f"{config.num_layers} layers, hidden {config.hidden_size}, {config.num_qo_heads}/{config.num_kv_heads} heads "
            f"x {config.head_dim}, vocab {config.vocab_size}, {config.dtype}")  # fmt: skip
    prompt_lens = [len(r.prompt) for r in requests]
    console.print(f"[bold]tilegraph demo[/] on {where}")
    console.print(f"model: {size}, random weights (seed {config.seed}); {len(requests)} requests, prompts "
                  f"{min(prompt_lens)}-{max(prompt_lens)} tokens fed one per step through the decode step; "
                  f"graph buckets {list(settings.graph_batch_sizes)}")  # fmt: skip
    model = LlamaDecoder(config, device)

    results: dict[str, LoopResult] = {}
    table = Table(title="continuous batching (step ms: median inter-token latency)")
    for col in ("mode", "steps", "tokens", "B", "step ms", "loop s", "setup s", "replay+eager"):
        table.add_column(col, justify="right")
    for mode in LOOP_ORDER:
        assert mode in MODES
        cut = GPU_PADDED_STEPS if mode == "eager_padded" and not SIMULATOR else None
        result, stats = run_loop(model, settings, requests, mode, max_steps=cut)
        results[mode] = result
        step_ms = np.array(result.step_s) * 1e3
        replays = f"{stats['replays']}+{stats['eager_steps']}" if "replays" in stats else "-"
        table.add_row(mode, str(result.num_steps), str(sum(map(len, result.tokens.values()))),
                      f"{min(result.batch_sizes)}-{max(result.batch_sizes)}", f"{np.median(step_ms):.2f}",
                      f"{step_ms.sum() / 1e3:.2f}", f"{stats['setup_s']:.2f}", replays)  # fmt: skip
        if not SIMULATOR:
            gc.collect()  # the runner (its KV cache and graph pool) goes before the next one
            torch.cuda.empty_cache()
    console.print(table)

    ok = True
    padded = results["eager_padded"]
    exact = is_prefix(padded.tokens, results["graphs"].tokens)
    ok &= exact
    over = "" if padded.num_steps == results["graphs"].num_steps else f" (its first {padded.num_steps} steps)"
    console.print(f"graph tokens == eager_padded tokens{over}, the bit-exact eager twin: "
                  + ("[green]identical[/]" if exact else "[red]DIFFERENT[/]"))  # fmt: skip
    same, total = token_agreement(results["eager"].tokens, results["graphs"].tokens)
    note = "" if same == total else " (eager runs its matmuls on B rows, a replay on the bucket's: last-bit differences can flip a near-tie)"
    console.print(f"plain eager vs graphs: {same}/{total} greedy tokens agree{note}")
    if not SIMULATOR:
        eager_ms = np.median(results["eager"].step_s) * 1e3
        graph_ms = np.median(results["graphs"].step_s) * 1e3
        console.print(f"inter-token latency (median step): eager {eager_ms:.2f} ms, graphs {graph_ms:.2f} ms "
                      f"-> graphs take {graph_ms / eager_ms:.2f}x")  # fmt: skip
    steps = min(results["graphs"].num_steps // 2, GPU_PADDED_STEPS)
    err = check_attention(model, settings, requests, steps)
    tol = 2e-2 if config.dtype == "bfloat16" else 5e-3
    passed = err is not None and err < tol
    shown = "no live request to check" if err is None else f"relative error {err:.2e}"
    console.print(f"layer 0 paged attention at step {steps} vs float64 reference: {shown} -> "
                  + ("[green]OK[/]" if passed else "[red]FAILED[/]"))  # fmt: skip
    ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
