"""``python -m tilegraph bench decode``: paged decode bandwidth against the copy ceiling and peers.

For each length mix (uniform, skewed, ShareGPT-like log-normal) and batch size: GB/s counting the
bytes a decode must move (KV of every token read once, q read, out written), as a fraction of the
device-to-device copy bandwidth measured in the same run. Implementations on the same shapes:
tilegraph (its table's engine for the shape), each of its two decode engines forced
(``tilegraph-cuda-cores``, ``tilegraph-tensor-cores``: the measured side of the tuning table's
choice), torch SDPA on gathered dense KV (padded to the longest request, masked), FlexAttention
(compiled; same dense KV and a length mask) and FlashInfer's paged decode wrapper if installed.
Every output is checked against the float64 reference (``rel_err``). CUDA-event medians after
warm-up; input sets rotated so one pass is at least 3x the L2; random data, never zeros.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .common import (
    MIXES,
    Reporter,
    Skip,
    Timing,
    choice_list,
    copy_bandwidth,
    int_list,
    length_mix,
    on_gpu,
    page_table,
    plot_lines,
    rotation_sets,
    run_meta,
    stats_us,
    time_calls_us,
)

if TYPE_CHECKING:
    from tilegraph.settings import Settings

NEEDS_GPU = True
PEERS = ("tilegraph-cuda-cores", "tilegraph-tensor-cores", "sdpa", "flex", "flashinfer")
COLUMNS = [
    ("mix", "mix", ""), ("batch_size", "B", ""), ("impl", "impl", ""), ("kv_tokens", "KV tokens", ""),
    ("median_us", "median µs", ".1f"), ("gbs", "GB/s", ".0f"), ("copy_fraction", "of copy", ".2f"),
    ("balance", "balance", ".3f"), ("rel_err", "rel err", ".1e"), ("skipped", "skipped", ""),
]  # fmt: skip


@dataclass
class Case:
    mix: str
    lengths: list[int]
    settings: "Settings"
    device: torch.device
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    kv_last_page_len: np.ndarray
    q_sets: list[torch.Tensor]
    kv_sets: list[torch.Tensor]
    reps: int
    warmup: int
    max_dense_bytes: int
    deadline: float | None = None  # perf_counter seconds after which slow peers (compiles) are skipped

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def bytes_moved(self) -> int:
        s = self.settings
        item = torch.tensor([], dtype=s.torch_dtype).element_size()
        kv = sum(self.lengths) * s.num_kv_heads * s.head_dim * 2 * item
        return kv + 2 * self.batch_size * s.num_qo_heads * s.head_dim * item


Impl = Callable[[Case], tuple[Timing, torch.Tensor, dict[str, Any]]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32, 64, 128], help="comma-separated (default 1,8,32,64,128)")
    parser.add_argument("--mixes", type=choice_list(MIXES), default=list(MIXES), help=f"comma-separated of {','.join(MIXES)}")
    parser.add_argument("--peers", type=choice_list(PEERS), default=list(PEERS), help=f"comma-separated of {','.join(PEERS)} ('' for none)")
    parser.add_argument("--num-qo-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=100, help="timed repetitions per implementation")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-dense-gib", type=float, default=8.0, help="skip dense peers whose padded KV needs more")


# ---- cases --------------------------------------------------------------------------------------


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, device=device).to(dtype)


def make_case(mix: str, lengths: list[int], args: argparse.Namespace, device: torch.device, rng: np.random.Generator, smoke: bool) -> Case:
    from tilegraph import Settings

    kv_indptr, kv_indices, kv_last = page_table(lengths, args.page_size, rng)
    num_pages = max(int(kv_indptr[-1]), 1)
    settings = Settings(num_qo_heads=args.num_qo_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                        page_size=args.page_size, dtype=args.dtype, max_batch_size=len(lengths),
                        max_num_pages=num_pages, num_ctas=1 if smoke else None)  # fmt: skip
    cache_shape = (num_pages, 2, args.page_size, args.num_kv_heads, args.head_dim)
    set_bytes = int(np.prod(cache_shape)) * torch.tensor([], dtype=settings.torch_dtype).element_size()
    num_sets = 1 if smoke else rotation_sets(set_bytes, device)
    kv_sets = [_random(cache_shape, settings.torch_dtype, device) for _ in range(num_sets)]
    q_sets = [_random((len(lengths), args.num_qo_heads, args.head_dim), settings.torch_dtype, device) for _ in range(num_sets)]
    return Case(mix, lengths, settings, device, kv_indptr, kv_indices, kv_last, q_sets, kv_sets,
                args.reps, args.warmup, int(args.max_dense_gib * 2**30))  # fmt: skip


# ---- implementations ----------------------------------------------------------------------------


def run_tilegraph(case: Case, engine: str = "auto") -> tuple[Timing, torch.Tensor, dict[str, Any]]:
    """BatchDecode with ``engine`` (Settings.decode_engine: "auto" is the tuning table's choice)."""
    from tilegraph import BatchDecode

    dec = BatchDecode(case.settings.model_copy(update={"decode_engine": engine}), device=case.device)
    plan = dec.plan(case.kv_indptr, case.kv_indices, case.kv_last_page_len)
    outs = [torch.full_like(q, float("nan")) for q in case.q_sets]
    n = len(outs)
    timing = time_calls_us(lambda i: dec.run(case.q_sets[i % n], case.kv_sets[i % n], out=outs[i % n]),
                          case.reps, case.warmup, case.gpu)  # fmt: skip
    return timing, outs[0], {"balance": float(plan.balance), "num_tiles": int(plan.num_tiles), "engine": dec.engine}


def _dense_kv(case: Case, kv_cache: torch.Tensor, padded_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [B, Hkv, padded_len, D] gathered from the paged cache; padding is random, never zeros."""
    s = case.settings
    shape = (case.batch_size, s.num_kv_heads, padded_len, s.head_dim)
    k, v = _random(shape, s.torch_dtype, case.device), _random(shape, s.torch_dtype, case.device)
    for r, length in enumerate(case.lengths):
        pages = torch.as_tensor(case.kv_indices[case.kv_indptr[r] : case.kv_indptr[r + 1]], dtype=torch.long, device=case.device)
        for dense, which in ((k, 0), (v, 1)):
            tokens = kv_cache[pages, which].reshape(-1, s.num_kv_heads, s.head_dim)[:length]
            dense[r, :, :length] = tokens.transpose(0, 1)
    return k, v


def _dense_sets(case: Case, multiple: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    s = case.settings
    padded_len = -(-max(case.lengths) // multiple) * multiple
    item = case.kv_sets[0].element_size()
    set_bytes = 2 * case.batch_size * s.num_kv_heads * padded_len * s.head_dim * item
    if set_bytes > case.max_dense_bytes:
        raise Skip(f"padded dense KV needs {set_bytes / 2**30:.1f} GiB (> --max-dense-gib)")
    num_sets = 1 if not case.gpu else rotation_sets(set_bytes, case.device, budget_bytes=case.max_dense_bytes)
    num_sets = min(num_sets, len(case.kv_sets))  # dense set j mirrors KV set j (and pairs with q set j)
    return [_dense_kv(case, case.kv_sets[j], padded_len) for j in range(num_sets)], padded_len


def _length_mask(case: Case, padded_len: int) -> torch.Tensor:
    lengths = torch.tensor(case.lengths, device=case.device)
    return (torch.arange(padded_len, device=case.device)[None, :] < lengths[:, None])[:, None, None, :]


def run_sdpa(case: Case) -> tuple[Timing, torch.Tensor, dict[str, Any]]:
    import torch.nn.functional as F

    dense, padded_len = _dense_sets(case, 16)
    mask = _length_mask(case, padded_len)
    scale = case.settings.sm_scale
    q4 = [q[:, :, None, :].contiguous() for q in case.q_sets]
    result: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:  # dense set j was gathered from KV set j: pair it with q set j
        j = i % len(dense)
        k, v = dense[j]
        result[j] = F.scaled_dot_product_attention(q4[j % len(q4)], k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    timing = time_calls_us(call, case.reps, case.warmup, case.gpu)
    return timing, result[0][:, :, 0, :], {"padded_len": padded_len}


_compiled_flex: Any = None


def run_flex(case: Case) -> tuple[Timing, torch.Tensor, dict[str, Any]]:
    global _compiled_flex
    if not case.gpu:
        raise Skip("FlexAttention is compiled for the GPU only")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise Skip(f"FlexAttention not importable: {err}") from None
    if case.deadline is not None and time.perf_counter() > case.deadline - 60:
        raise Skip("less than 60 s of the time budget left (FlexAttention compiles per shape)")
    dense, padded_len = _dense_sets(case, 128)
    lengths = torch.tensor(case.lengths, device=case.device)

    def keep(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return kv_idx < lengths[b]

    block_mask = create_block_mask(keep, case.batch_size, None, 1, padded_len, device=case.device)
    if _compiled_flex is None:
        for knob in ("cache_size_limit", "recompile_limit"):  # one compile per shape, many shapes
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    scale = case.settings.sm_scale
    q4 = [q[:, :, None, :].contiguous() for q in case.q_sets]
    result: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:  # dense set j was gathered from KV set j: pair it with q set j
        j = i % len(dense)
        k, v = dense[j]
        result[j] = _compiled_flex(q4[j % len(q4)], k, v, block_mask=block_mask, scale=scale, enable_gqa=True)

    timing = time_calls_us(call, case.reps, case.warmup, case.gpu)
    return timing, result[0][:, :, 0, :], {"padded_len": padded_len}


def run_flashinfer(case: Case) -> tuple[Timing, torch.Tensor, dict[str, Any]]:
    try:
        import flashinfer
    except ImportError:
        raise Skip("flashinfer is not installed") from None
    if not case.gpu:
        raise Skip("FlashInfer needs a GPU")
    s, dev = case.settings, case.device
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(
        torch.as_tensor(case.kv_indptr, device=dev), torch.as_tensor(case.kv_indices, device=dev),
        torch.as_tensor(case.kv_last_page_len, device=dev), s.num_qo_heads, s.num_kv_heads, s.head_dim,
        s.page_size, q_data_type=s.torch_dtype, kv_data_type=s.torch_dtype, sm_scale=s.sm_scale,
    )  # fmt: skip
    n = len(case.q_sets)
    result: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        result[i % n] = wrapper.run(case.q_sets[i % n], case.kv_sets[i % n])

    timing = time_calls_us(call, case.reps, case.warmup, case.gpu)
    return timing, result[0], {"flashinfer": getattr(flashinfer, "__version__", "?")}


IMPLS: dict[str, Impl] = {
    "tilegraph": run_tilegraph,
    "tilegraph-cuda-cores": lambda case: run_tilegraph(case, "cuda_cores"),
    "tilegraph-tensor-cores": lambda case: run_tilegraph(case, "tensor_cores"),
    "sdpa": run_sdpa,
    "flex": run_flex,
    "flashinfer": run_flashinfer,
}


# ---- the suite ----------------------------------------------------------------------------------


def measure_case(case: Case, impls: list[str], copy_gbs: float) -> list[dict[str, Any]]:
    from tilegraph.serving.reference import decode_reference, relative_error

    ref_out, _ = decode_reference(case.q_sets[0], case.kv_sets[0], case.settings, case.kv_indptr, case.kv_indices, case.kv_last_page_len)
    base = {"mix": case.mix, "batch_size": case.batch_size, "kv_tokens": int(sum(case.lengths)),
            "max_len": int(max(case.lengths)), "bytes_moved": case.bytes_moved(), "input_sets": len(case.q_sets)}  # fmt: skip
    rows = []
    for name in impls:
        row = {**base, "impl": name}
        try:
            timing, out, extra = IMPLS[name](case)
        except Skip as why:
            rows.append({**row, "skipped": str(why)})
            continue
        except Exception as err:  # a peer failing must not cost the rest of the suite
            rows.append({**row, "skipped": f"error: {type(err).__name__}: {str(err)[:300]}"})
            if case.gpu:
                torch.cuda.synchronize()
            continue
        s = stats_us(timing)
        gbs = case.bytes_moved() / (s["median_us"] * 1e3)
        rows.append({**row, **s, **extra, "gbs": gbs, "copy_fraction": gbs / copy_gbs if copy_gbs else None,
                     "rel_err": relative_error(out, ref_out)})  # fmt: skip
    return rows


def _smoke_args(args: argparse.Namespace) -> argparse.Namespace:
    tiny = dict(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16", reps=1, warmup=0,
                batch_sizes=[2], mixes=["skewed"], peers=[p for p in args.peers if p in ("sdpa", "tilegraph-tensor-cores")])  # fmt: skip
    return argparse.Namespace(**{**vars(args), **tiny})


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run the suite; writes ``decode.json`` (after every case) and ``decode.png`` into ``out_dir``.

    Two passes over the cases: tilegraph and the quick peers first, then FlexAttention (it compiles
    once per shape), so a time budget never costs the quick measurements."""
    smoke = bool(args.smoke)
    if smoke:
        args = _smoke_args(args)
    gpu = on_gpu()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    lengths_kw = dict(uniform_tokens=8, long_tokens=13, short_tokens=3, median_tokens=6) if smoke else {}
    cases = [(mix, b) for mix in args.mixes for b in args.batch_sizes]
    passes = [["tilegraph", *(p for p in args.peers if p != "flex")]] + ([["flex"]] if "flex" in args.peers else [])
    started = time.perf_counter()
    deadline = None if args.time_budget_s is None else started + args.time_budget_s
    with Reporter("decode", out_dir / "decode.json", COLUMNS, len(cases) * len(passes), run_meta(device, smoke)) as report:
        report.step("ceiling: device-to-device copy")
        copy = copy_bandwidth(device, 2**23 if smoke else 2**30, reps=3 if smoke else 30)
        report.payload["ceilings"]["copy"] = copy
        report.payload["shape"] = {k: getattr(args, k) for k in ("num_qo_heads", "num_kv_heads", "head_dim", "page_size", "dtype")}
        for impls in passes:
            for index, (mix, batch_size) in enumerate(cases):
                if deadline is not None and time.perf_counter() > deadline:
                    report.note(f"time budget spent: {'+'.join(impls)} on {mix} B={batch_size} not run")
                    report.advance()
                    continue
                report.step(f"{'+'.join(impls)}: {mix} B={batch_size}")
                rng = np.random.default_rng([args.seed, index])  # the same case in every pass
                torch.manual_seed(args.seed * 100_003 + index)
                case = make_case(mix, length_mix(mix, batch_size, rng, **lengths_kw), args, device, rng, smoke)
                case.deadline = deadline
                for row in measure_case(case, impls, copy["gbs"]):
                    report.add(row, advance=False)
                report.advance()
                del case
                if gpu:
                    torch.cuda.empty_cache()
    payload = report.payload
    plot_lines(payload["rows"], out_dir / "decode.png", x="batch_size", y="gbs", line="impl", panel="mix",
               ceiling=("d2d copy", copy["gbs"]), title=f"paged decode on {payload['meta']['device']['name']}",
               xlabel="batch size", ylabel="GB/s (KV + q + out)")  # fmt: skip
    return payload
