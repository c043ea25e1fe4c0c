"""``python -m tilegraph bench graphs``: per-step latency of the Llama-style decoder, eager vs
CUDA-graph replay, and the share of a replay spent in attention.

For each batch size (default 1, 8, 64, 256) a skewed batch -- one ``--long-tokens`` request among
``--short-tokens`` ones, pages from a PagePool, the KV cache filled with random values -- takes one
decode step (one new token per request), repeatedly:

  eager_step_us      step tables upload + plan + eager forward, host wall time until the GPU is done
  replay_step_us     step tables upload + GraphRunner.run (plan, input copy, plan upload, replay), same clock
  replay_over_eager  the ratio (the goal: <= 0.5 at small B)
  replay_gpu_us      one replay alone, device time (CUDA events around back-to-back replays of one plan)
  attention_gpu_us   append_kv + BatchDecode of every layer alone, captured as its own graph, same clock
  attention_share    attention_gpu_us / replay_gpu_us
  plan_us            BatchDecode.plan alone (host)
  logits_max_diff    max |eager - replay| of the step's logits (0: the replay computes what eager does)

Every step re-appends the same new token slot, so the lengths stay fixed across repetitions. The
step times are medians of ``--reps`` after ``--warmup``; each includes one device sync (what a
serving loop pays to read its sampled tokens back).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .common import EXIT_NEEDS_GPU, Reporter, int_list, length_mix, needs_gpu_message, on_gpu, plot_lines, run_meta, stats_us, time_calls_us

NEEDS_GPU = True
COLUMNS = [
    ("batch_size", "B", ""), ("kv_tokens", "KV tokens", ""), ("eager_step_us", "eager step µs", ".0f"),
    ("replay_step_us", "replay step µs", ".0f"), ("replay_over_eager", "replay/eager", ".2f"),
    ("replay_gpu_us", "replay GPU µs", ".0f"), ("attention_share", "attention share", ".2f"), ("plan_us", "plan µs", ".0f"),
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8, 64, 256], help="comma-separated (default 1,8,64,256)")
    parser.add_argument("--long-tokens", type=int, default=32768, help="KV length of the long request")
    parser.add_argument("--short-tokens", type=int, default=512, help="KV length of every other request")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--num-qo-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilegraph bench graphs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "graphs", help="output folder")
    parser.add_argument("--smoke", action="store_true", help="tiny model, tiny batches, host clock: checks the suite runs (no real numbers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget-s", type=float, default=None, help="stop starting new batch sizes after this long")
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse ``argv``, run, write ``--out/graphs.json`` (+ .png); returns the rows. On the simulator
    without ``--smoke`` it refuses (SystemExit 3)."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.smoke and not on_gpu():
        print(needs_gpu_message("bench graphs") + "; or pass --smoke for one tiny host-timed run.", file=sys.stderr)
        raise SystemExit(EXIT_NEEDS_GPU)
    return run(args, args.out)["rows"]


def _smoke_args(args: argparse.Namespace) -> argparse.Namespace:
    tiny = dict(batch_sizes=[1, 2], long_tokens=21, short_tokens=5, layers=2, hidden=64, intermediate=128, num_qo_heads=4,
                num_kv_heads=2, head_dim=16, vocab=128, page_size=4, dtype="float16", reps=2, warmup=1)  # fmt: skip
    return argparse.Namespace(**{**vars(args), **tiny})


def _wall_us(call: Callable[[], Any], reps: int, warmup: int, gpu: bool) -> dict[str, Any]:
    """Host wall time of ``call()`` plus a device sync, per repetition."""
    times = []
    for rep in range(warmup + reps):
        start = time.perf_counter_ns()
        call()
        if gpu:
            torch.cuda.synchronize()
        if rep >= warmup:
            times.append((time.perf_counter_ns() - start) / 1e3)
    return {"median_us": float(np.median(times)), "p10_us": float(np.percentile(times, 10)),
            "p90_us": float(np.percentile(times, 90))}  # fmt: skip


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    from tilegraph.graphs.runner import GraphRunner
    from tilegraph.serving.llama import LlamaConfig, LlamaDecoder
    from tilegraph.page_pool import PagePool
    from tilegraph.serving import DecodeRunner

    smoke = bool(args.smoke)
    if smoke:
        args = _smoke_args(args)
    gpu = on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    batch_sizes = sorted(set(args.batch_sizes))
    lengths = {b: length_mix("skewed", b, np.random.default_rng(0), long_tokens=args.long_tokens, short_tokens=args.short_tokens)
               for b in batch_sizes}  # fmt: skip
    pages_needed = max(sum(-(-(n + 1) // args.page_size) for n in lens) for lens in lengths.values())
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_layers=args.layers, num_qo_heads=args.num_qo_heads, num_kv_heads=args.num_kv_heads,
                         head_dim=args.head_dim, max_position=args.long_tokens + 16, dtype=args.dtype, seed=args.seed)  # fmt: skip
    settings = config.attention_settings(page_size=args.page_size, max_batch_size=batch_sizes[-1], max_num_pages=pages_needed,
                                         graphs={"batch_sizes": batch_sizes})  # fmt: skip
    started = time.perf_counter()
    deadline = None if args.time_budget_s is None else started + args.time_budget_s
    with Reporter("graphs", out_dir / "graphs.json", COLUMNS, len(batch_sizes), run_meta(device, smoke)) as report:
        report.payload["model"] = {k: getattr(config, k) for k in ("num_layers", "hidden_size", "intermediate_size", "num_qo_heads",
                                                                    "num_kv_heads", "head_dim", "vocab_size", "dtype")}  # fmt: skip
        report.step("building the model, compiling kernels and capturing every bucket")
        model = LlamaDecoder(config, device)
        capture_start = time.perf_counter()
        runner = DecodeRunner(model, settings, mode="graphs")
        report.payload["capture_s"] = time.perf_counter() - capture_start
        runner.paged.kv_cache.normal_()  # random KV, never zeros
        attention_graphs = _attention_runner(runner, GraphRunner)
        for batch_size in batch_sizes:
            if deadline is not None and time.perf_counter() > deadline:
                report.note(f"time budget spent: B={batch_size} not run")
                report.advance()
                continue
            report.step(f"B={batch_size}")
            row = measure(runner, attention_graphs, PagePool(settings), lengths[batch_size], args, gpu)
            report.add(row)
            if gpu:
                torch.cuda.empty_cache()
    payload = report.payload
    plot_rows = [{"batch_size": r["batch_size"], "how": how, "step_us": r[f"{how}_step_us"]}
                 for r in payload["rows"] for how in ("eager", "replay") if f"{how}_step_us" in r]  # fmt: skip
    plot_lines(plot_rows, out_dir / "graphs.png", x="batch_size", y="step_us", line="how",
               title=f"decoder step on {payload['meta']['device']['name']}", xlabel="batch size", ylabel="µs per step")  # fmt: skip
    return payload


def _attention_runner(runner: Any, graph_runner_cls: Any) -> Any:
    """A GraphRunner over the decoder's attention alone: every layer's append_kv + BatchDecode.run on
    the model's cache, step tables and (shared) BatchDecode, with fixed random q, k, v."""
    from tilegraph.append import append_kv

    s, paged = runner.settings, runner.paged
    dtype, device = s.torch_dtype, paged.kv_cache.device

    def attention_only(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        q, k, v, positions = inputs["q"], inputs["k"], inputs["v"], inputs["positions"]
        out = q
        for layer in range(paged.kv_cache.shape[0]):
            cache = paged.kv_cache[layer]
            append_kv(k, v, cache, paged.batch_indices[: k.shape[0]], positions, paged.kv_indptr, paged.kv_indices, s,
                      check_values=False)  # fmt: skip
            out = paged.decode.run(q, cache)
        return out

    example = {"q": torch.zeros(1, s.num_qo_heads, s.head_dim, dtype=dtype, device=device),
               "k": torch.zeros(1, s.num_kv_heads, s.head_dim, dtype=dtype, device=device),
               "v": torch.zeros(1, s.num_kv_heads, s.head_dim, dtype=dtype, device=device),
               "positions": torch.zeros(1, dtype=torch.int32, device=device)}  # fmt: skip
    graphs = graph_runner_cls(attention_only, example, attention=paged.decode, settings=s)
    runner.buffers.views["batch_indices"].fill_(-1)  # the warm-up appends nothing
    graphs.capture_all(show_progress=False)
    for t in graphs.static_inputs.values():
        if t.is_floating_point():
            t.normal_()
    return graphs


def measure(runner: Any, attention_graphs: Any, pool: Any, lengths: list[int], args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    batch_size = len(lengths)
    ids = list(range(batch_size))
    for rid, n in zip(ids, lengths):
        pool.allocate(rid, n)
    append = pool.allocate_step(ids)  # the step's new token: every repetition rewrites this slot
    table = pool.page_table(ids)
    token_ids = np.random.default_rng(batch_size).integers(0, runner.model.config.vocab_size, batch_size).astype(np.int32)
    buffers, decode, graphs = runner.buffers, runner.decode, runner.graphs
    inputs = buffers.inputs(batch_size)

    def eager_step() -> None:
        buffers.load(token_ids, append, table)
        decode.plan(*table)
        runner.forward(inputs)

    def replay_step() -> None:
        buffers.load(token_ids, append, table)
        graphs.run(inputs, *table)

    eager = _wall_us(eager_step, args.reps, args.warmup, gpu)
    replay = _wall_us(replay_step, args.reps, args.warmup, gpu)
    decode.plan(*table)
    eager_logits = runner.forward(inputs)
    buffers.load(token_ids, append, table)
    replay_logits = graphs.run(inputs, *table)  # bucket == B: the same shapes, so the same bits
    logits_max_diff = float((eager_logits - replay_logits).abs().max())
    plan = stats_us(time_calls_us(lambda i: decode.plan(*table, padded_batch_size=batch_size), args.reps, args.warmup, gpu=False))
    # device time of one replay: the bucket's graph replayed back to back with the plan just uploaded
    replay_step()
    model_graph = graphs._graphs[batch_size].graph
    replay_gpu = stats_us(time_calls_us(lambda i: model_graph.replay(), args.reps, args.warmup, gpu))
    attention_graphs.static_inputs["positions"][:batch_size].copy_(inputs["positions"])
    decode.plan(*table, padded_batch_size=batch_size)
    attention_graphs.replay(batch_size)
    attention_graph = attention_graphs._graphs[batch_size].graph
    attention_gpu = stats_us(time_calls_us(lambda i: attention_graph.replay(), args.reps, args.warmup, gpu))
    for rid in ids:
        pool.free(rid)
    return {
        "batch_size": batch_size, "kv_tokens": int(sum(lengths)) + batch_size, "max_len": int(max(lengths)) + 1,
        "eager_step_us": eager["median_us"], "eager_step_p90_us": eager["p90_us"],
        "replay_step_us": replay["median_us"], "replay_step_p90_us": replay["p90_us"],
        "replay_over_eager": replay["median_us"] / eager["median_us"],
        "replay_gpu_us": replay_gpu["median_us"], "attention_gpu_us": attention_gpu["median_us"],
        "attention_share": attention_gpu["median_us"] / replay_gpu["median_us"],
        "plan_us": plan["median_us"], "logits_max_diff": logits_max_diff, "clock": "host wall + sync; cuda-event for *_gpu_us" if gpu else "host",
    }  # fmt: skip


if __name__ == "__main__":
    main()
