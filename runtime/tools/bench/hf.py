"""``python -m tilegraph bench hf``: transformers ``generate()`` on the tilegraph backend vs ``sdpa``.

A random-weight ``LlamaForCausalLM`` (or a Mistral / Gemma2, see below; nothing downloaded; default
8 layers, hidden 2048, 32 query / 8 KV heads of 64, bf16) generates ``--new-tokens`` greedy tokens for a batch of left-padded random
prompts (ShareGPT-like log-normal lengths), with

  sdpa             attn_implementation="sdpa" (transformers' own), the default dynamic cache
  tilegraph        attn_implementation="tilegraph", the default dynamic cache (one KV copy per call)
  tilegraph-paged  attn_implementation="tilegraph", ``TilegraphCache`` (paged KV, decode reads in place)
  tilegraph-static attn_implementation="tilegraph", ``cache_implementation="static"`` (queries at
                   cache_position inside max_cache_len; the path torch.compile users take)

``--sliding-window W`` builds a Mistral (every layer windowed: tilegraph's sliding-window variant)
instead of a Llama; ``--soft-cap C`` a Gemma2 (soft-capped logits, alternating window / full layers,
window ``W`` or 4096).

Per batch size and implementation: ``generate_ms`` (median of CUDA-event-timed generate() calls of
``--new-tokens`` after warm-up), ``prefill_ms`` (the same with one new token: the prompt's forward
plus one sampled token), ``decode_ms_per_token`` = (generate - prefill) / (new_tokens - 1) (one
decode step of the whole batch), ``ms_per_token`` = generate / new_tokens, ``tokens_per_s`` = batch
x new_tokens / generate; and whether its greedy tokens equal sdpa's (``tokens_match``, and
``first_divergence``: the first generated step where any row differs -- bf16 rounding differs
between backends, so a late divergence on random weights is not an error). Prompt sets (random
token ids) are rotated between calls; the match is checked on set 0.

Without transformers installed the suite says so and writes a JSON with the reason (exit 0).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import Reporter, choice_list, int_list, on_gpu, plot_lines, run_meta, stats_us, time_calls_us

NEEDS_GPU = True
IMPLS = ("sdpa", "tilegraph", "tilegraph-paged", "tilegraph-static")
DEFAULT_IMPLS = IMPLS[:3]
CACHES = {"tilegraph-paged": "paged", "tilegraph-static": "static"}
COLUMNS = [
    ("batch_size", "B", ""), ("impl", "impl", ""), ("prompt_tokens", "prompt tokens", ""), ("new_tokens", "new", ""),
    ("generate_ms", "generate ms", ".1f"), ("prefill_ms", "prefill ms", ".1f"), ("decode_ms_per_token", "ms/decode step", ".2f"),
    ("tokens_per_s", "tokens/s", ".0f"), ("speedup_vs_sdpa", "vs sdpa", ".2f"), ("tokens_match", "match", ""),
    ("skipped", "skipped", ""),
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8], help="comma-separated (default 1,8)")
    parser.add_argument("--impls", type=choice_list(IMPLS), default=list(DEFAULT_IMPLS),
                        help=f"comma-separated of {','.join(IMPLS)} (default {','.join(DEFAULT_IMPLS)})")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-median", type=int, default=256, help="median prompt length (log-normal, sigma 1)")
    parser.add_argument("--prompt-max", type=int, default=1024, help="prompt lengths are clipped to [8, this]")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--num-qo-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--page-size", type=int, default=16, help="TilegraphCache page size")
    parser.add_argument("--reps", type=int, default=3, help="timed generate() calls per implementation")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sliding-window", type=int, default=None, help="build a Mistral with this window (default: a Llama)")
    parser.add_argument("--soft-cap", type=float, default=None, help="build a Gemma2 with this attention soft-cap")


def _smoke_args(args: argparse.Namespace) -> argparse.Namespace:
    tiny = dict(batch_sizes=[2], new_tokens=3, prompt_median=4, prompt_max=6, layers=2, hidden=64, intermediate=128,
                num_qo_heads=4, num_kv_heads=2, vocab=128, dtype="float32", page_size=4, reps=1, warmup=0)  # fmt: skip
    return argparse.Namespace(**{**vars(args), **tiny})


def build_model(args: argparse.Namespace, device: torch.device) -> Any:
    import transformers

    fields = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.num_qo_heads, num_key_value_heads=args.num_kv_heads,
                  head_dim=args.hidden // args.num_qo_heads, max_position_embeddings=args.prompt_max + args.new_tokens + 16,
                  pad_token_id=0, bos_token_id=None, eos_token_id=None)  # fmt: skip
    if args.soft_cap is not None:
        names = ("Gemma2Config", "Gemma2ForCausalLM")
        fields |= dict(attn_logit_softcapping=args.soft_cap, sliding_window=args.sliding_window or 4096)
    elif args.sliding_window is not None:
        names, fields = ("MistralConfig", "MistralForCausalLM"), fields | dict(sliding_window=args.sliding_window)
    else:
        names = ("LlamaConfig", "LlamaForCausalLM")
    config = getattr(transformers, names[0])(**fields)
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialize the weights where they will live
        model = getattr(transformers, names[1])(config)
    model = model.to(getattr(torch, args.dtype)).eval()
    model.generation_config.eos_token_id = None  # every row generates exactly new_tokens
    model.generation_config.pad_token_id = 0
    return model


def prompt_sets(batch_size: int, args: argparse.Namespace, device: torch.device, num_sets: int) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Real prompt lengths (log-normal, the same for every set) and ``num_sets`` left-padded
    (input_ids, attention_mask) batches of random token ids (never the pad id)."""
    rng = np.random.default_rng([args.seed, batch_size])
    draws = rng.lognormal(mean=math.log(args.prompt_median), sigma=1.0, size=batch_size)
    lengths = np.clip(np.rint(draws), min(8, args.prompt_max), args.prompt_max).astype(int).tolist()
    width = max(lengths)
    sets = []
    for _ in range(num_sets):
        ids = torch.zeros(batch_size, width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            ids[row, width - n :] = torch.from_numpy(rng.integers(1, args.vocab, size=n))
            mask[row, width - n :] = 1
        sets.append((ids.to(device), mask.to(device)))
    return lengths, sets


def _generate(model: Any, impl: str, name: str, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pages: int, page_size: int) -> torch.Tensor:
    from tilegraph.integrations.transformers import TilegraphCache

    extra: dict[str, Any] = {}
    if CACHES.get(impl) == "paged":
        extra["cache"] = TilegraphCache(model.config, max_num_pages=pages, page_size=page_size)
    elif CACHES.get(impl) == "static":
        extra["cache_implementation"] = "static"
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, **extra)  # fmt: skip
    return out[:, ids.shape[1] :]


def measure_impl(model: Any, impl: str, name: str, lengths: list[int], sets: list[tuple[torch.Tensor, torch.Tensor]],
                 args: argparse.Namespace, gpu: bool) -> tuple[dict[str, Any], torch.Tensor]:  # fmt: skip
    """Timings of one implementation, and its generated tokens for prompt set 0."""
    model.set_attn_implementation("sdpa" if impl == "sdpa" else name)
    pages = sum(-(-(n + args.new_tokens) // args.page_size) for n in lengths) + len(lengths)
    tokens: dict[int, torch.Tensor] = {}

    def call(new_tokens: int) -> Any:
        def one(i: int) -> None:
            j = i % len(sets)
            result = _generate(model, impl, name, *sets[j], new_tokens, pages, args.page_size)
            if new_tokens == args.new_tokens:
                tokens[j] = result

        return one

    full = stats_us(time_calls_us(call(args.new_tokens), args.reps, args.warmup, gpu))
    first = stats_us(time_calls_us(call(1), args.reps, args.warmup, gpu)) if args.new_tokens > 1 else full
    generate_ms, prefill_ms = full["median_us"] / 1e3, first["median_us"] / 1e3
    row = {"generate_ms": generate_ms, "generate_p10_ms": full["p10_us"] / 1e3, "generate_p90_ms": full["p90_us"] / 1e3,
           "prefill_ms": prefill_ms, "reps": full["reps"], "ms_per_token": generate_ms / args.new_tokens,
           "decode_ms_per_token": (generate_ms - prefill_ms) / (args.new_tokens - 1) if args.new_tokens > 1 else None,
           "tokens_per_s": len(lengths) * args.new_tokens / (generate_ms / 1e3)}  # fmt: skip
    return row, tokens[0]


def _first_divergence(tokens: torch.Tensor, expected: torch.Tensor) -> int | None:
    differs = (tokens.cpu() != expected.cpu()).any(dim=0).nonzero()
    return int(differs[0]) if differs.numel() else None


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run the suite; writes ``hf.json`` (after every row) and ``hf.png`` into ``out_dir``."""
    smoke = bool(args.smoke)
    if smoke:
        args = _smoke_args(args)
    gpu = on_gpu()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    impls = ["sdpa", *(i for i in args.impls if i != "sdpa")]  # sdpa first: its tokens are the reference
    batch_sizes = sorted(set(args.batch_sizes))
    started = time.perf_counter()
    deadline = None if args.time_budget_s is None else started + args.time_budget_s
    with Reporter("hf", out_dir / "hf.json", COLUMNS, len(batch_sizes) * len(impls), run_meta(device, smoke)) as report:
        try:
            import transformers

            from tilegraph.integrations.transformers import clear_attention_objects, register
        except ImportError as err:
            reason = f"transformers is not usable here ({err}); pip install 'tilegraph[transformers]'"
            report.payload["skipped"] = reason
            report.note(f"bench hf skipped: {reason}")
            return report.payload
        report.payload["versions_transformers"] = transformers.__version__
        name = register()
        report.step("building the random-weight model")
        model = build_model(args, device)
        report.payload["model"] = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "num_qo_heads", "num_kv_heads",
                                                                  "vocab", "dtype", "sliding_window", "soft_cap")}  # fmt: skip
        report.payload["generate"] = {"new_tokens": args.new_tokens, "prompt_median": args.prompt_median,
                                      "prompt_max": args.prompt_max, "page_size": args.page_size, "greedy": True}  # fmt: skip
        for batch_size in batch_sizes:
            lengths, sets = prompt_sets(batch_size, args, device, num_sets=1 if smoke else 2)
            base = {"batch_size": batch_size, "prompt_tokens": int(sum(lengths)), "max_prompt": int(max(lengths)),
                    "new_tokens": args.new_tokens}  # fmt: skip
            expected: torch.Tensor | None = None
            sdpa_ms: float | None = None
            for impl in impls:
                row = {**base, "impl": impl, "cache": CACHES.get(impl, "dynamic")}
                if deadline is not None and time.perf_counter() > deadline:
                    report.add({**row, "skipped": "time budget spent"})
                    continue
                report.step(f"B={batch_size} {impl}")
                try:
                    timing, tokens = measure_impl(model, impl, name, lengths, sets, args, gpu)
                except Exception as err:  # one backend failing must not cost the rest
                    report.add({**row, "skipped": f"error: {type(err).__name__}: {str(err)[:300]}"})
                    if gpu:
                        torch.cuda.synchronize()
                    continue
                row.update(timing)
                if impl == "sdpa":
                    expected, sdpa_ms = tokens, timing["generate_ms"]
                if expected is not None:
                    divergence = _first_divergence(tokens, expected)
                    row.update(tokens_match=divergence is None, first_divergence=divergence)
                if sdpa_ms is not None:
                    row["speedup_vs_sdpa"] = sdpa_ms / timing["generate_ms"]
                report.add(row)
            clear_attention_objects()
            if gpu:
                torch.cuda.empty_cache()
    payload = report.payload
    plot_lines(payload["rows"], out_dir / "hf.png", x="batch_size", y="tokens_per_s", line="impl",
               title=f"generate() on {payload['meta']['device']['name']}", xlabel="batch size",
               ylabel=f"generated tokens/s ({args.new_tokens} new)")  # fmt: skip
    return payload
