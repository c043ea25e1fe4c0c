"""``python -m tilegraph demo``: a Llama-style model serving requests by continuous batching with
chunked prefill -- each step's prompt chunks and decode tokens in one BatchPrefill launch per layer
(``ChunkedRunner``) -- eagerly and under CUDA graphs bucketed by token rows, with the checks that
say both compute the same thing.

On a GPU: a Llama-3.2-1B-shaped model (16 layers, hidden 2048, 32/8 heads, bf16, random weights),
48 requests whose prompts run from 1 to ~500 tokens; time to first token and inter-token latency,
eager vs graphs. On a CPU-only machine: a 2-layer model at a tiny size on the numba CUDA simulator,
the graphs through the graph stand-in (the simulator is for correctness, not speed). Either way it
checks that

  * the greedy tokens of the graph loop equal those of its bit-exact eager twin (``eager_padded``,
    eager on the bucket's rows) -- exit 1 if not;
  * layer 0's paged attention of one step matches a float64 reference on the gathered cache;
  * it reports how many tokens of plain eager (other matmul shapes) and of the one-token-per-step
    decode loop (``DecodeRunner``: prompts through the decode kernel) agree.
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
from .chunked import ChunkedRunner
from .loop import MODES, DecodeRunner, LoopResult, Request, attention_error, serve
from tilegraph.settings import Settings

LOOP_ORDER = ("eager_padded", "graphs", "eager")  # the first loop also pays kernel compilation
GPU_PADDED_STEPS = 150  # on a GPU the bit-exact twin runs this many steps (its tokens are a prefix)


def tiny_setup(seed: int) -> tuple[LlamaConfig, Settings, list[Request]]:
    config = LlamaConfig.tiny(seed=seed)
    settings = config.attention_settings(page_size=4, max_batch_size=6, max_num_pages=12, num_ctas=4,
                                         max_num_tokens=8, graphs={"batch_sizes": [1, 2, 4]})  # fmt: skip
    rng = np.random.default_rng(seed)
    # (prompt length, new tokens, arrival step): tiny to "long" (4 pages), joining at steps 0-3
    shapes = [(12, 3, 0), (1, 3, 0), (5, 2, 1), (2, 4, 2), (1, 2, 2), (2, 1, 3), (3, 3, 3)]
    requests = [Request(i, tuple(rng.integers(0, config.vocab_size, p).tolist()), n, a) for i, (p, n, a) in enumerate(shapes)]
    return config, settings, requests


def gpu_setup(seed: int, num_requests: int) -> tuple[LlamaConfig, Settings, list[Request]]:
    config = LlamaConfig(seed=seed)
    settings = config.attention_settings(page_size=16, max_batch_size=64, max_num_pages=4096, max_num_tokens=512)
    rng = np.random.default_rng(seed)
    prompt_lens = np.exp(rng.uniform(0, np.log(512), num_requests)).astype(int)  # log-uniform 1..511
    new_tokens = rng.integers(8, 97, num_requests)
    arrivals = np.sort(rng.integers(0, 128, num_requests))
    requests = [Request(i, tuple(rng.integers(0, config.vocab_size, p).tolist()), int(n), int(a))
                for i, (p, n, a) in enumerate(zip(prompt_lens, new_tokens, arrivals))]  # fmt: skip
    return config, settings, requests


def run_loop(model: LlamaDecoder, settings: Settings, requests: list[Request], mode: str,
             max_steps: int | None = None, chunked: bool = True) -> tuple[LoopResult, dict]:  # fmt: skip
    start = time.perf_counter()
    kind = ChunkedRunner if chunked else DecodeRunner
    runner = kind(model, settings, mode=mode, show_progress=not SIMULATOR)  # type: ignore[arg-type]
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
    runner = ChunkedRunner(model, settings, mode="eager")
    pool = PagePool(settings)
    serve(runner, requests, pool, max_steps=steps)
    if not pool.request_ids:
        return None
    return attention_error(runner, pool, [0] * len(pool.request_ids))


def latencies_ms(result: LoopResult, text: bool = True) -> tuple:
    """Medians over requests of time to first token and mean inter-token latency, in ms."""
    ttft = [result.ttft_s(rid) * 1e3 for rid, steps in result.token_steps.items() if steps]
    itl = [v * 1e3 for v in (result.itl_s(rid) for rid, steps in result.token_steps.items() if steps) if v is not None]
    values = (float(np.median(ttft)) if ttft else float("nan"), float(np.median(itl)) if itl else float("nan"))
    return tuple(f"{v:.1f}" for v in values) if text else values


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
    if not console.is_terminal:
        console = Console(width=120)  # a log or CI: the table's columns stay readable
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
                  f"{min(prompt_lens)}-{max(prompt_lens)} tokens prefilled in chunks of up to {settings.max_num_tokens} "
                  f"token rows per step next to the decodes")  # fmt: skip
    model = LlamaDecoder(config, device)

    results: dict[str, LoopResult] = {}
    table = Table(title="continuous batching with chunked prefill (medians over requests: TTFT, ITL)")
    for col in ("loop", "steps", "tokens", "B", "rows", "TTFT ms", "ITL ms", "loop s", "setup s", "replay+eager"):
        table.add_column(col, justify="right")
    for mode in (*LOOP_ORDER, "decode"):
        assert mode in MODES or mode == "decode"
        cut = GPU_PADDED_STEPS if mode == "eager_padded" and not SIMULATOR else None
        chunked = mode != "decode"
        result, stats = run_loop(model, settings, requests, mode if chunked else "eager", max_steps=cut, chunked=chunked)
        results[mode] = result
        step_ms = np.array(result.step_s) * 1e3
        replays = f"{stats['replays']}+{stats['eager_steps']}" if "replays" in stats else "-"
        ttft, itl = latencies_ms(result)
        rows = f"{min(result.step_tokens)}-{max(result.step_tokens)}"
        label = mode if chunked else "decode-only"
        table.add_row(label, str(result.num_steps), str(sum(map(len, result.tokens.values()))),
                      f"{min(result.batch_sizes)}-{max(result.batch_sizes)}", rows, ttft, itl,
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
    note = "" if same == total else " (eager runs its matmuls on the step's rows, a replay on the bucket's: last-bit differences can flip a near-tie)"
    console.print(f"plain eager vs graphs: {same}/{total} greedy tokens agree{note}")
    same, total = token_agreement(results["decode"].tokens, results["graphs"].tokens)
    console.print(f"decode-only loop (prompts one token per step through the decode kernel) vs chunked graphs: "
                  f"{same}/{total} greedy tokens agree; steps {results['decode'].num_steps} vs {results['graphs'].num_steps}")  # fmt: skip
    if not SIMULATOR:
        for name, pick in (("time to first token", 0), ("inter-token latency", 1)):
            eager_v, graph_v = (float(latencies_ms(results[m], text=False)[pick]) for m in ("eager", "graphs"))
            console.print(f"{name} (median over requests): eager {eager_v:.2f} ms, graphs {graph_v:.2f} ms "
                          f"-> graphs take {graph_v / eager_v:.2f}x")  # fmt: skip
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
