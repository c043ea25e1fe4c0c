"""``python -m tilegraph bench prefill``: batch prefill TFLOP/s against the bf16 matmul ceiling and peers.

For each batch size, length mix and mask (causal / full): TFLOP/s counting only the score and PV work
a prefill cannot avoid -- ``4 * head_dim * num_qo_heads * visible (query, key) pairs`` (a causal
request of qo_len q over kv_len k sees ``q * (k - q) + q * (q + 1) / 2`` pairs; a full one ``q * k``)
-- as a fraction of the bf16 matmul rate measured in the same run. Padding, masked-out blocks and
split-KV merges are never counted, so every implementation is charged for the same work.

Length mixes, as (qo_len, kv_len) per request:

  uniform    every request a fresh ``--uniform-tokens`` prompt (qo = kv)
  skewed     one ``--long-tokens`` prompt among ``--short-tokens`` ones (qo = kv)
  lognormal  ShareGPT-like prompts: median ``--median-tokens``, sigma 1, clipped to [16, long] (qo = kv)
  append     chunked prefill: a ``--chunk-tokens`` chunk onto a log-normal prefix (qo < kv)
  mixed      one chunk onto a log-normal prefix among decode requests (qo = 1) -- one launch

Implementations on the same inputs (the ragged K/V is gathered from the paged cache):

  tilegraph         BatchPrefill over the paged cache
  tilegraph-ragged  BatchPrefillRagged over contiguous ragged K/V
  sdpa-varlen       torch's flash-attention varlen kernel (``aten._flash_attention_forward`` with
                    cumulative lengths; causal masks aligned to the end of the KV) -- the packed peer
  sdpa              ``F.scaled_dot_product_attention`` under ``sdpa_kernel(FLASH_ATTENTION)`` on a
                    dense padded batch; the flash backend takes no mask, so it runs only where padding
                    cannot change the real rows (causal with qo = kv for all, or full with equal kv)
  flex              FlexAttention (compiled) on the packed batch with a document mask (block-sparse)

Outputs are checked against the float64 reference on sampled rows (``rel_err``: the last query rows
of the longest and of the first request). CUDA-event medians after warm-up, repetitions sized to
``--impl-budget-s`` per implementation (at least 5); input sets rotated so one pass is at least 3x
the L2 where they fit; random inputs, never zeros (padding included).
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .common import (
    Reporter,
    Skip,
    Timing,
    choice_list,
    int_list,
    matmul_rate,
    on_gpu,
    plot_lines,
    rotation_sets,
    run_meta,
    stats_us,
    time_calls_us,
)

if TYPE_CHECKING:
    from tilegraph.settings import Settings

NEEDS_GPU = True
MIXES = ("uniform", "skewed", "lognormal", "append", "mixed")
MASKS = ("causal", "full")
IMPLS_ALL = ("tilegraph", "tilegraph-ragged", "sdpa-varlen", "sdpa", "flex")
PEERS = ("sdpa-varlen", "sdpa", "flex")
CHECK_ROWS = 64  # query rows per sampled request checked against the float64 reference
COLUMNS = [
    ("batch_size", "B", ""), ("mix", "mix", ""), ("mask", "mask", ""), ("impl", "impl", ""),
    ("q_tokens", "q tokens", ""), ("kv_tokens", "KV tokens", ""), ("median_us", "median µs", ".0f"),
    ("tflops", "TFLOP/s", ".1f"), ("matmul_fraction", "of matmul", ".3f"), ("rel_err", "rel err", ".1e"),
    ("skipped", "skipped", ""),
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32], help="comma-separated (default 1,8,32)")
    parser.add_argument("--mixes", type=choice_list(MIXES), default=list(MIXES), help=f"comma-separated of {','.join(MIXES)}")
    parser.add_argument("--masks", type=choice_list(MASKS), default=list(MASKS), help="comma-separated of causal,full")
    parser.add_argument("--peers", type=choice_list(PEERS), default=list(PEERS), help=f"comma-separated of {','.join(PEERS)} ('' for none)")
    parser.add_argument("--num-qo-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--uniform-tokens", type=int, default=1024)
    parser.add_argument("--long-tokens", type=int, default=8192, help="the skewed mix's long prompt; the log-normal clip")
    parser.add_argument("--short-tokens", type=int, default=256)
    parser.add_argument("--median-tokens", type=int, default=700)
    parser.add_argument("--chunk-tokens", type=int, default=256, help="query chunk of the append / mixed mixes")
    parser.add_argument("--max-q-tokens", type=int, default=65536, help="skip cases with more query tokens")
    parser.add_argument("--reps", type=int, default=50, help="at most this many timed repetitions per implementation")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--impl-budget-s", type=float, default=1.5, help="timed seconds per implementation and case (>= 5 reps)")
    parser.add_argument("--max-dense-gib", type=float, default=6.0, help="skip the padded SDPA peer when its inputs need more")


# ---- cases --------------------------------------------------------------------------------------


def request_lengths(kind: str, batch_size: int, rng: np.random.Generator, args: argparse.Namespace) -> list[tuple[int, int]]:
    """(qo_len, kv_len) per request for the mix ``kind`` (see the module docstring)."""
    long = args.long_tokens

    def lognormal(n: int) -> list[int]:
        draws = rng.lognormal(mean=math.log(args.median_tokens), sigma=1.0, size=n)
        return np.clip(np.rint(draws), min(16, long), long).astype(int).tolist()

    if kind == "uniform":
        return [(args.uniform_tokens, args.uniform_tokens)] * batch_size
    if kind == "skewed":
        return [(long, long)] + [(args.short_tokens, args.short_tokens)] * (batch_size - 1)
    if kind == "lognormal":
        return [(n, n) for n in lognormal(batch_size)]
    if kind == "append":
        return [(args.chunk_tokens, n + args.chunk_tokens) for n in lognormal(batch_size)]
    if kind == "mixed":
        prefixes = lognormal(batch_size)
        return [(args.chunk_tokens, prefixes[0] + args.chunk_tokens)] + [(1, n) for n in prefixes[1:]]
    raise ValueError(f"unknown length mix {kind!r}: one of {MIXES}")


def visible_pairs(requests: list[tuple[int, int]], causal: bool) -> int:
    """(query, key) pairs the mask leaves visible: what a prefill must compute."""
    total = 0
    for qo, kv in requests:
        if causal:
            total += qo * (kv - qo) + qo * (qo + 1) // 2
        else:
            total += qo * kv
    return total


@dataclass
class Case:
    mix: str
    requests: list[tuple[int, int]]  # (qo_len, kv_len)
    causal: bool
    settings: "Settings"
    device: torch.device
    qo_indptr: np.ndarray
    kv_indptr: np.ndarray  # pages
    kv_indices: np.ndarray
    kv_last_page_len: np.ndarray
    kv_tok_indptr: np.ndarray  # tokens (ragged)
    q_sets: list[torch.Tensor]  # [nnz_q, Hq, D]
    cache_sets: list[torch.Tensor]  # [pages, 2, ps, Hkv, D]
    k_sets: list[torch.Tensor]  # [nnz_kv, Hkv, D], gathered from cache_sets
    v_sets: list[torch.Tensor]
    reps: int
    warmup: int
    impl_budget_s: float
    max_dense_bytes: int
    deadline: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def batch_size(self) -> int:
        return len(self.requests)

    @property
    def q_tokens(self) -> int:
        return int(self.qo_indptr[-1])

    @property
    def kv_tokens(self) -> int:
        return int(self.kv_tok_indptr[-1])

    def flops(self) -> int:
        s = self.settings
        return 4 * s.head_dim * s.num_qo_heads * visible_pairs(self.requests, self.causal)


Impl = Callable[[Case], tuple[Timing, torch.Tensor, dict[str, Any]]]


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, device=device).to(dtype)


def _token_pages(requests: list[tuple[int, int]], kv_indptr: np.ndarray, kv_indices: np.ndarray, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(page, slot) of every KV token, requests in order: where ragged row t lives in the paged cache."""
    pages, slots = [], []
    for r, (_, kv) in enumerate(requests):
        t = np.arange(kv)
        pages.append(kv_indices[kv_indptr[r] + t // page_size])
        slots.append(t % page_size)
    return np.concatenate(pages).astype(np.int64), np.concatenate(slots).astype(np.int64)


def make_case(mix: str, requests: list[tuple[int, int]], causal: bool, args: argparse.Namespace, device: torch.device,
              rng: np.random.Generator, smoke: bool) -> Case:  # fmt: skip
    from tilegraph import Settings

    from .common import page_table

    ps = args.page_size
    kv_lens = [kv for _, kv in requests]
    kv_indptr, kv_indices, kv_last = page_table(kv_lens, ps, rng)
    qo_indptr = np.concatenate([[0], np.cumsum([qo for qo, _ in requests])]).astype(np.int32)
    kv_tok_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    num_pages = max(int(kv_indptr[-1]), 1)
    settings = Settings(num_qo_heads=args.num_qo_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                        page_size=ps, dtype=args.dtype, max_batch_size=len(requests), max_num_pages=num_pages,
                        max_num_tokens=max(int(qo_indptr[-1]), 1), num_ctas=1 if smoke else None)  # fmt: skip
    dtype = settings.torch_dtype
    item = torch.tensor([], dtype=dtype).element_size()
    cache_shape = (num_pages, 2, ps, args.num_kv_heads, args.head_dim)
    q_shape = (int(qo_indptr[-1]), args.num_qo_heads, args.head_dim)
    set_bytes = (2 * int(np.prod(cache_shape)) + int(np.prod(q_shape))) * item  # cache + its ragged copy + q
    num_sets = 1 if smoke else rotation_sets(set_bytes, device, max_sets=8, budget_bytes=2 * 2**30)
    pages, slots = _token_pages(requests, kv_indptr, kv_indices, ps)
    pages_t, slots_t = torch.as_tensor(pages, device=device), torch.as_tensor(slots, device=device)
    cache_sets = [_random(cache_shape, dtype, device) for _ in range(num_sets)]
    k_sets = [c[pages_t, 0, slots_t].contiguous() for c in cache_sets]
    v_sets = [c[pages_t, 1, slots_t].contiguous() for c in cache_sets]
    q_sets = [_random(q_shape, dtype, device) for _ in range(num_sets)]
    return Case(mix, requests, causal, settings, device, qo_indptr, kv_indptr, kv_indices, kv_last, kv_tok_indptr,
                q_sets, cache_sets, k_sets, v_sets, args.reps, args.warmup, args.impl_budget_s,
                int(args.max_dense_gib * 2**30))  # fmt: skip


# ---- timing -------------------------------------------------------------------------------------


def measure(call: Callable[[int], Any], case: Case) -> Timing:
    """One call (compiles, warms), one CUDA-event-timed call to estimate the cost, up to ``warmup - 1``
    more warm-up calls (no more than a fifth of the budget), then enough timed repetitions to fill
    ``impl_budget_s`` (at least 5, at most ``reps``). On the simulator: ``reps`` host-timed calls
    after ``warmup``."""
    if not case.gpu:
        return time_calls_us(call, case.reps, case.warmup, gpu=False)
    call(0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    call(1)
    end.record()
    torch.cuda.synchronize()
    estimate_us = max(start.elapsed_time(end) * 1e3, 1.0)
    budget_us = case.impl_budget_s * 1e6
    warmup = int(max(0, min(case.warmup - 1, 0.2 * budget_us // estimate_us)))
    reps = int(max(5, min(case.reps, budget_us // estimate_us)))
    return time_calls_us(lambda i: call(i + 2), reps, warmup, gpu=True)


# ---- implementations (each returns (timing, packed out [nnz_q, Hq, D] of input set 0, extras)) ---


def run_tilegraph(case: Case) -> tuple[Timing, torch.Tensor, dict[str, Any]]:
    from tilegraph import BatchPrefill

    pre = BatchPrefill(case.settings, causal=case.causal, device=case.device)
    t0 = time.perf_counter_ns()
    plan = pre.plan(case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_len)
    plan_us = (time.perf_counter_ns() - t0) / 1e3
    outs = [torch.full_like(q, float("nan")) for q in case.q_sets]
    n = len(outs)
    timing = measure(lambda i: pre.run(case.q_sets[i % n], case.cache_sets[i % n], out=outs[i % n]), case)
    return timing, outs[0], {"plan_us": plan_us, "balance": float(plan.balance), "num_tiles": int(plan.num_tiles)}


def run_tilegraph_ragged(case: Case) -> tuple[Timing, torch.Tensor, dict[str, Any]]:
    from tilegraph import BatchPrefillRagged

    pre = BatchPrefillRagged(case.settings, causal=case.causal, device=case.device)
    t0 = time.perf_counter_ns()
    plan = pre.plan(case.qo_indptr, case.kv_tok_indptr)
    plan_us = (time.perf_counter_ns() - t0) / 1e3
    outs = [torch.full_like(q, float("nan")) for q in case.q_sets]
    n = len(outs)
    timing = measure(lambda i: pre.run(case.q_sets[i % n], case.k_sets[i % n], case.v_sets[i % n], out=outs[i % n]), case)
    return timing, outs[0], {"plan_us": plan_us, "balance": float(plan.balance), "num_tiles": int(plan.num_tiles)}


def run_sdpa_varlen(case: Case) -> tuple[Timing, torch.Tensor, dict[str, Any]]:
    """torch's flash-attention varlen forward on the packed batch (cumulative lengths, no padding)."""
    if not case.gpu:
        raise Skip("the flash varlen kernel needs CUDA")
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if op is None:
        raise Skip("torch has no aten._flash_attention_forward")
    dev = case.device
    cu_q = torch.as_tensor(case.qo_indptr, dtype=torch.int32, device=dev)
    cu_k = torch.as_tensor(case.kv_tok_indptr, dtype=torch.int32, device=dev)
    max_q = max(qo for qo, _ in case.requests)
    max_k = max(kv for _, kv in case.requests)
    scale = case.settings.sm_scale
    n = len(case.q_sets)
    ks, vs = case.k_sets, case.v_sets
    extra: dict[str, Any] = {"kernel": "aten._flash_attention_forward (varlen)"}
    try:  # the flash kernel reads GQA natively; a torch build that refuses gets K/V heads expanded
        op(case.q_sets[0], ks[0], vs[0], cu_q, cu_k, max_q, max_k, 0.0, case.causal, False, scale=scale)
    except RuntimeError as err:
        group = case.settings.group_size
        if group == 1:
            raise
        ks = [k.repeat_interleave(group, dim=1) for k in ks]
        vs = [v.repeat_interleave(group, dim=1) for v in vs]
        extra["note"] = f"K/V heads expanded {group}x (GQA refused: {str(err)[:120]})"
    result: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        j = i % n
        result[j] = op(case.q_sets[j], ks[j], vs[j], cu_q, cu_k, max_q, max_k, 0.0, case.causal, False, scale=scale)[0]

    timing = measure(call, case)
    return timing, result[0], extra


def _padded_exact(case: Case) -> bool:
    """Whether flash SDPA (no mask) on a right-padded batch computes the real rows exactly."""
    if case.causal:  # top-left causal == end-aligned when qo = kv, and then no real query sees padding
        return all(qo == kv for qo, kv in case.requests)
    return len({kv for _, kv in case.requests}) == 1  # full: padded keys would be attended otherwise


def run_sdpa(case: Case) -> tuple[Timing, torch.Tensor, dict[str, Any]]:
    """``F.scaled_dot_product_attention`` with the flash backend on a dense right-padded batch."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not _padded_exact(case):
        raise Skip("flash SDPA takes no mask: padding would change real rows (see varlen)")
    s, dev = case.settings, case.device
    bsz, max_q, max_k = case.batch_size, max(qo for qo, _ in case.requests), max(kv for _, kv in case.requests)
    item = case.q_sets[0].element_size()
    set_bytes = (bsz * s.num_qo_heads * max_q * 2 + bsz * s.num_kv_heads * max_k * 2) * s.head_dim * item
    if set_bytes > case.max_dense_bytes:
        raise Skip(f"padded dense inputs need {set_bytes / 2**30:.1f} GiB (> --max-dense-gib)")
    num_sets = min(len(case.q_sets), max(1, case.max_dense_bytes // max(set_bytes, 1)))
    # packed token t of request r -> (r, position): scatter into random padding (never zeros)
    q_req = np.repeat(np.arange(bsz), [qo for qo, _ in case.requests])
    q_pos = np.arange(case.q_tokens) - case.qo_indptr[q_req]
    k_req = np.repeat(np.arange(bsz), [kv for _, kv in case.requests])
    k_pos = np.arange(case.kv_tokens) - case.kv_tok_indptr[k_req]
    qr, qp = torch.as_tensor(q_req, device=dev), torch.as_tensor(q_pos, device=dev)
    kr, kp = torch.as_tensor(k_req, device=dev), torch.as_tensor(k_pos, device=dev)
    dense = []
    for j in range(num_sets):
        q = _random((bsz, max_q, s.num_qo_heads, s.head_dim), s.torch_dtype, dev)
        k = _random((bsz, max_k, s.num_kv_heads, s.head_dim), s.torch_dtype, dev)
        v = _random((bsz, max_k, s.num_kv_heads, s.head_dim), s.torch_dtype, dev)
        q[qr, qp], k[kr, kp], v[kr, kp] = case.q_sets[j], case.k_sets[j], case.v_sets[j]
        dense.append(tuple(t.transpose(1, 2) for t in (q, k, v)))  # [B, H, L, D] views, the layout flash reads
    result: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        j = i % num_sets
        q, k, v = dense[j]
        result[j] = F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, scale=s.sm_scale, enable_gqa=True)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # outside the timed calls: no host cost in them
        timing = measure(call, case)
    packed = result[0].transpose(1, 2)[qr, qp]  # [nnz_q, Hq, D]
    return timing, packed, {"padded_q": max_q, "padded_kv": max_k}


_compiled_flex: Any = None


def run_flex(case: Case) -> tuple[Timing, torch.Tensor, dict[str, Any]]:
    """FlexAttention on the packed batch: one sequence of all queries over one of all keys, a document
    mask (plus the end-aligned causal mask) keeps each request to its own KV; block-sparse."""
    global _compiled_flex
    if not case.gpu:
        raise Skip("FlexAttention is compiled for the GPU only")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise Skip(f"FlexAttention not importable: {err}") from None
    if case.deadline is not None and time.perf_counter() > case.deadline - 30:
        raise Skip("less than 30 s of the time budget left (FlexAttention compiles per shape)")
    s, dev = case.settings, case.device
    block = 128
    len_q, len_k = -(-case.q_tokens // block) * block, -(-case.kv_tokens // block) * block
    bsz = case.batch_size
    q_doc = torch.full((len_q,), -1, dtype=torch.int32, device=dev)  # padding rows match no key
    k_doc = torch.full((len_k,), -2, dtype=torch.int32, device=dev)
    q_req = np.repeat(np.arange(bsz), [qo for qo, _ in case.requests])
    k_req = np.repeat(np.arange(bsz), [kv for _, kv in case.requests])
    q_doc[: case.q_tokens] = torch.as_tensor(q_req, dtype=torch.int32, device=dev)
    k_doc[: case.kv_tokens] = torch.as_tensor(k_req, dtype=torch.int32, device=dev)
    # key position of query t in its request's KV coordinates (end-aligned), and of key t
    q_end = np.zeros(len_q, np.int32)
    q_end[: case.q_tokens] = np.arange(case.q_tokens) - case.qo_indptr[q_req] + np.array([kv - qo for qo, kv in case.requests])[q_req]
    k_pos = np.zeros(len_k, np.int32)
    k_pos[: case.kv_tokens] = np.arange(case.kv_tokens) - case.kv_tok_indptr[k_req]
    q_end_t, k_pos_t = torch.as_tensor(q_end, device=dev), torch.as_tensor(k_pos, device=dev)
    causal = case.causal

    def keep(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        same = q_doc[q_idx] == k_doc[kv_idx]
        return (same & (k_pos_t[kv_idx] <= q_end_t[q_idx])) if causal else same

    compile_kw = {"_compile": True} if "_compile" in inspect.signature(create_block_mask).parameters else {}
    block_mask = create_block_mask(keep, 1, None, len_q, len_k, device=dev, **compile_kw)  # compiled: no [Q, KV] temporaries
    if _compiled_flex is None:
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)

    def padded(t: torch.Tensor, length: int) -> torch.Tensor:  # [n, H, D] -> [1, H, length, D], random padding
        out = _random((length, t.shape[1], t.shape[2]), t.dtype, dev)
        out[: t.shape[0]] = t
        return out.transpose(0, 1).unsqueeze(0)

    n = len(case.q_sets)
    sets = [(padded(case.q_sets[j], len_q), padded(case.k_sets[j], len_k), padded(case.v_sets[j], len_k)) for j in range(n)]
    result: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        j = i % n
        q, k, v = sets[j]
        result[j] = _compiled_flex(q, k, v, block_mask=block_mask, scale=s.sm_scale, enable_gqa=True)

    timing = measure(call, case)
    packed = result[0][0].transpose(0, 1)[: case.q_tokens]
    return timing, packed, {"block_sparsity": float(getattr(block_mask, "sparsity", lambda: float("nan"))())}


IMPLS: dict[str, Impl] = {"tilegraph": run_tilegraph, "tilegraph-ragged": run_tilegraph_ragged, "sdpa-varlen": run_sdpa_varlen,
                          "sdpa": run_sdpa, "flex": run_flex}  # fmt: skip


# ---- checking and the suite ---------------------------------------------------------------------


def reference_rows(case: Case) -> tuple[np.ndarray, torch.Tensor]:
    """Packed query rows sampled for checking, and their float64 reference outputs (input set 0): the
    last ``CHECK_ROWS`` rows of the request with the longest KV and of the first request."""
    from tilegraph.serving.reference import attention_reference

    longest = int(np.argmax([kv for _, kv in case.requests]))
    rows, outs = [], []
    for r in dict.fromkeys((longest, 0)):
        qo, kv = case.requests[r]
        first = max(qo - CHECK_ROWS, 0)
        q0 = int(case.qo_indptr[r])
        k0 = int(case.kv_tok_indptr[r])
        q = case.q_sets[0][q0 + first : q0 + qo]
        k = case.k_sets[0][k0 : k0 + kv].double().cpu()
        v = case.v_sets[0][k0 : k0 + kv].double().cpu()
        offset = kv - qo + first if case.causal else None
        out, _ = attention_reference(q, k, v, case.settings.sm_scale, offset)
        rows.append(np.arange(q0 + first, q0 + qo))
        outs.append(out)
    return np.concatenate(rows), torch.cat(outs)


def measure_case(case: Case, impls: list[str], matmul_tflops: float, ref: tuple[np.ndarray, torch.Tensor]) -> list[dict[str, Any]]:
    from tilegraph.serving.reference import relative_error

    rows_idx, ref_out = ref
    flops = case.flops()
    base = {"mix": case.mix, "batch_size": case.batch_size, "mask": "causal" if case.causal else "full",
            "q_tokens": case.q_tokens, "kv_tokens": case.kv_tokens, "max_qo": max(qo for qo, _ in case.requests),
            "max_kv": max(kv for _, kv in case.requests), "flops": flops, "input_sets": len(case.q_sets)}  # fmt: skip
    out_rows = []
    for name in impls:
        row = {**base, "impl": name}
        try:
            timing, out, extra = IMPLS[name](case)
        except Skip as why:
            out_rows.append({**row, "skipped": str(why)})
            continue
        except Exception as err:  # one implementation failing must not cost the rest of the suite
            out_rows.append({**row, "skipped": f"error: {type(err).__name__}: {str(err)[:300]}"})
            if case.gpu:
                torch.cuda.synchronize()
            continue
        s = stats_us(timing)
        tflops = flops / (s["median_us"] * 1e6)
        idx = torch.as_tensor(rows_idx, device=out.device)
        out_rows.append({**row, **s, **extra, "tflops": tflops,
                         "matmul_fraction": tflops / matmul_tflops if matmul_tflops else None,
                         "rel_err": relative_error(out[idx], ref_out)})  # fmt: skip
    return out_rows


def _smoke_args(args: argparse.Namespace) -> argparse.Namespace:
    tiny = dict(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float16", reps=1, warmup=0,
                batch_sizes=[2], mixes=["skewed"], masks=["causal", "full"], uniform_tokens=8, long_tokens=9,
                short_tokens=3, median_tokens=6, chunk_tokens=3, peers=[p for p in args.peers if p != "flex"])  # fmt: skip
    return argparse.Namespace(**{**vars(args), **tiny})


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run the suite; writes ``prefill.json`` (after every case) and ``prefill.png`` into ``out_dir``.

    Two passes over the cases (batch size outermost, so a time budget keeps every mix at the small
    sizes): tilegraph and the quick peers first, then FlexAttention (it compiles per shape)."""
    smoke = bool(args.smoke)
    if smoke:
        args = _smoke_args(args)
    gpu = on_gpu()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    cases = [(b, mix, mask) for b in args.batch_sizes for mix in args.mixes for mask in args.masks]
    quick = ["tilegraph", "tilegraph-ragged", *(p for p in args.peers if p != "flex")]
    passes = [quick] + ([["flex"]] if "flex" in args.peers else [])
    started = time.perf_counter()
    deadline = None if args.time_budget_s is None else started + args.time_budget_s
    with Reporter("prefill", out_dir / "prefill.json", COLUMNS, len(cases) * len(passes), run_meta(device, smoke)) as report:
        report.step("ceiling: bf16 matmul")
        matmul = matmul_rate(device, 256, reps=2) if smoke else matmul_rate(device)
        report.payload["ceilings"]["matmul_bf16"] = matmul
        report.payload["shape"] = {k: getattr(args, k) for k in ("num_qo_heads", "num_kv_heads", "head_dim", "page_size", "dtype")}
        report.payload["flops_counted"] = "4 * head_dim * num_qo_heads * visible (query, key) pairs"
        for impls in passes:
            for index, (batch_size, mix, mask) in enumerate(cases):
                label = f"{'+'.join(impls)}: B={batch_size} {mix} {mask}"
                if deadline is not None and time.perf_counter() > deadline:
                    report.note(f"time budget spent: {label} not run")
                    report.advance()
                    continue
                rng = np.random.default_rng([args.seed, batch_size, MIXES.index(mix)])  # same lengths for both masks, every pass
                requests = request_lengths(mix, batch_size, rng, args)
                if sum(qo for qo, _ in requests) > args.max_q_tokens:
                    report.note(f"{label}: {sum(qo for qo, _ in requests)} query tokens > --max-q-tokens, not run")
                    report.advance()
                    continue
                report.step(label)
                torch.manual_seed(args.seed * 100_003 + index)
                case = make_case(mix, requests, mask == "causal", args, device, rng, smoke)
                case.deadline = deadline
                ref = reference_rows(case)
                for row in measure_case(case, impls, matmul["tflops"], ref):
                    report.add(row, advance=False)
                report.advance()
                del case
                if gpu:
                    torch.cuda.empty_cache()
    payload = report.payload
    plot_rows = [{**r, "line": f"{r['impl']} ({r['mask']})"} for r in payload["rows"]]
    plot_lines(plot_rows, out_dir / "prefill.png", x="batch_size", y="tflops", line="line", panel="mix",
               ceiling=("bf16 matmul", matmul["tflops"]), title=f"batch prefill on {payload['meta']['device']['name']}",
               xlabel="batch size", ylabel="TFLOP/s (visible pairs only)")  # fmt: skip
    return payload
