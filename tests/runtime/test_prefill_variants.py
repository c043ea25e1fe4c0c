"""Attention variants on batch prefill (paged and ragged) against float64 references: every built-in,
user hooks, split and unsplit plans, causal; qo_pos = kv_len - qo_len + i for query token i."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import variants as V
from tilegraph.serving.reference import gather_kv, relative_error

TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 1e-4}
BASE = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16", max_batch_size=4,
            max_num_pages=48, max_num_tokens=16, max_custom_mask_bits=512)  # fmt: skip
# (qo_len, kv_len): a prefill with a prefix, a decode row over a long KV, a fresh prefill, an empty one
REQUESTS = [(3, 40), (1, 37), (5, 5), (0, 6)]
SPLITS = {"unsplit": 1, "split": 8}

sys.path.insert(0, str(Path(__file__).parent))
from test_variants import rope_reference  # noqa: E402  (the decode tests' float64 RoPE)


# ---- float64 reference ------------------------------------------------------------------------------


def prefill_variant_reference(q, kv_of, settings, requests, *, causal=True, logits=None, mask=None, sinks=None,
                              rope=None, softmax=True, key_fn=None, out_fn=None):  # fmt: skip
    """Prefill in float64 with the variant's pieces as torch functions of (scores [H, n, L], request,
    qo_pos [1, n, 1], kv_pos [1, 1, L], qo_head [H, 1, 1]). -> (out [nnz_q, H, D], lse [nnz_q, H])."""
    group, heads = settings.group_size, settings.num_qo_heads
    outs, lses, start = [], [], 0
    for r, (qo_len, kv_len) in enumerate(requests):
        qr = q[start : start + qo_len].double().cpu()
        start += qo_len
        k, v = kv_of(r)
        pos = torch.arange(qo_len) + kv_len - qo_len
        if rope is not None:
            qr = rope_reference(qr, pos[:, None], *rope)
            k = rope_reference(k, torch.arange(kv_len)[:, None], *rope)
        if key_fn is not None:
            k = key_fn(k, r)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        s = torch.einsum("nhd,lhd->hnl", qr, k) * settings.sm_scale
        qo_pos, kv_pos = pos[None, :, None], torch.arange(kv_len)[None, None, :]
        qo_head = torch.arange(heads)[:, None, None]
        if logits is not None:
            s = logits(s, r, qo_pos, kv_pos, qo_head)
        keep = torch.ones_like(s, dtype=torch.bool)
        if mask is not None:
            keep = keep & mask(r, qo_pos, kv_pos, qo_head)
        if causal:
            keep = keep & (kv_pos <= qo_pos)
        if softmax:
            s = s.masked_fill(~keep, float("-inf"))
            cols = s if sinks is None else torch.cat([s, sinks.double()[:, None, None].expand(-1, qo_len, 1)], 2)
            lse = torch.logsumexp(cols, dim=-1)
            w = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        else:
            lse = torch.zeros(heads, qo_len, dtype=torch.float64)
            w = s.masked_fill(~keep, 0.0)
        o = torch.einsum("hnl,lhd->nhd", w, v)
        if out_fn is not None:
            o = out_fn(o, r, pos[:, None, None])
        outs.append(o)
        lses.append(lse.transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


# ---- helpers ---------------------------------------------------------------------------------------


def tables(requests, page_size, pool, rng):
    counts = [-(-kv // page_size) for _, kv in requests]
    pages = rng.permutation(pool)[: sum(counts)].astype(np.int32)
    qo_indptr = np.concatenate([[0], np.cumsum([qo for qo, _ in requests])]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(kv - 1) % page_size + 1 if kv else 1 for _, kv in requests], np.int32)
    return qo_indptr, kv_indptr, pages, last


def run_prefill(variant, device, split, params=None, requests=REQUESTS, return_lse=True, ragged=False,
                causal=True, **overrides):  # fmt: skip
    """Plan + run ``variant`` on fresh random inputs into a poisoned output.
    -> (settings, q, kv_of, got, lse, plan)."""
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**{**BASE, "num_ctas": SPLITS[split], **overrides})
    qo_indptr, kv_indptr, pages, last = tables(requests, settings.page_size, settings.max_num_pages, rng)
    rows = int(qo_indptr[-1])
    hkv, hd, dtype = settings.num_kv_heads, settings.head_dim, settings.torch_dtype
    q = torch.randn(rows, settings.num_qo_heads, hd).to(dtype).to(device)
    if ragged:
        kv_tok = np.concatenate([[0], np.cumsum([kv for _, kv in requests])]).astype(np.int32)
        k = torch.randn(int(kv_tok[-1]), hkv, hd).to(dtype).to(device)
        v = torch.randn(int(kv_tok[-1]), hkv, hd).to(dtype).to(device)
        pre = tilegraph.BatchPrefillRagged(settings, causal=causal, variant=variant, device=device)
        plan = pre.plan(qo_indptr, kv_tok)

        def kv_of(r):
            a, b = int(kv_tok[r]), int(kv_tok[r + 1])
            return k[a:b].double().cpu(), v[a:b].double().cpu()

        inputs: tuple[Any, ...] = (k, v)
    else:
        cache = torch.randn(settings.max_num_pages, 2, settings.page_size, hkv, hd).to(dtype).to(device)
        pre = tilegraph.BatchPrefill(settings, causal=causal, variant=variant, device=device)
        plan = pre.plan(qo_indptr, kv_indptr, pages, last)

        def kv_of(r):
            ids = torch.as_tensor(pages[kv_indptr[r] : kv_indptr[r + 1]], dtype=torch.long)
            return gather_kv(cache, settings, ids, requests[r][1])

        inputs = (cache,)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)  # poisoned
    result = pre.run(q, *inputs, out=out, return_lse=return_lse, params=params)
    got, lse = result if return_lse else (result, None)
    assert (plan.num_merges > 0) == (split == "split"), plan
    return settings, q, kv_of, got, lse, plan


def check(settings, got, lse, ref_out, ref_lse, plan, lse_tol=1e-4):
    assert not torch.isnan(got.cpu()).any(), plan
    assert relative_error(got, ref_out) < TOLERANCE[settings.dtype], plan
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert relative_error(lse.cpu()[finite], ref_lse[finite]) < lse_tol, plan
        assert torch.isneginf(lse.cpu()[~finite]).all(), plan


def reference(s, q, kv_of, **pieces):
    return prefill_variant_reference(q, kv_of, s, REQUESTS, **pieces)


# ---- built-ins -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_soft_cap(device, split):
    cap = 0.7  # small enough to bite
    s, q, kv_of, got, lse, plan = run_prefill(V.soft_cap(30.0), device, split, params={"logits_soft_cap": cap})
    check(s, got, lse, *reference(s, q, kv_of, logits=lambda x, *_: cap * torch.tanh(x / cap)), plan)


@pytest.mark.parametrize("split", SPLITS)
def test_sliding_window(device, split):
    window = int(np.random.default_rng().integers(2, 9))
    s, q, kv_of, got, lse, plan = run_prefill(V.sliding_window(window), device, split)
    check(s, got, lse, *reference(s, q, kv_of, mask=lambda r, qo, kv, h: qo - kv <= window), plan)


@pytest.mark.parametrize("split", SPLITS)
def test_alibi(device, split):
    s, q, kv_of, got, lse, plan = run_prefill(V.alibi(), device, split, ragged=split == "split")
    slopes = torch.as_tensor(V.alibi_slopes(s.num_qo_heads), dtype=torch.float64)[:, None, None]
    check(s, got, lse, *reference(s, q, kv_of, logits=lambda x, r, qo, kv, h: x + slopes * (kv - qo)), plan)


@pytest.mark.parametrize("split", SPLITS)
def test_attention_sinks(device, split):
    """A sink per head joins each row's denominator exactly once: in the tile for final rows, in the
    merge for split rows (twice would change both out and LSE)."""
    sinks = torch.randn(BASE["num_qo_heads"]) * 2
    s, q, kv_of, got, lse, plan = run_prefill(V.attention_sinks(), device, split, params={"sinks": sinks})
    check(s, got, lse, *reference(s, q, kv_of, sinks=sinks), plan)


@pytest.mark.parametrize("split", SPLITS)
def test_sigmoid_softmax_free(device, split):
    bias = -0.5
    s, q, kv_of, got, _, plan = run_prefill(V.sigmoid_attention(bias), device, split, return_lse=False, dtype="float32")
    ref_out, _ = reference(s, q, kv_of, logits=lambda x, *_: torch.sigmoid(x + bias), softmax=False)
    check(s, got, None, ref_out, None, plan)


@pytest.mark.parametrize("split", SPLITS)
def test_rope_on_unrotated_kv(device, split):
    """q rotated at its token's position, each k at its kv position (head_dim 48: 6 lanes)."""
    theta, scale = 500.0, 2.0
    s, q, kv_of, got, lse, plan = run_prefill(V.rope(theta, scale), device, split, head_dim=48, dtype="float32")
    check(s, got, lse, *reference(s, q, kv_of, rope=(theta, scale)), plan)


@pytest.mark.parametrize("split", SPLITS)
def test_rope_on_tensor_cores(device, split):
    """fp16 RoPE runs on the tensor-core kernel: q and k rotated in fp32, rounded to fp16 for the mma
    (2**-11 relative per element, so the LSE is held to 1e-3, the output to the fp16 tolerance)."""
    from tilegraph.kernels import primitives as prim
    from tilegraph.kernels.prefill_mma import tensor_core_config

    theta, scale = 500.0, 2.0
    variant = V.rope(theta, scale)
    settings = tilegraph.Settings(**{**BASE, "num_ctas": SPLITS[split], "head_dim": 32})
    hooks = variant.decode_hooks(settings)
    assert tensor_core_config(prim.F16, 32, settings.group_size, True, True, hooks) is not None
    s, q, kv_of, got, lse, plan = run_prefill(variant, device, split, head_dim=32)
    check(s, got, lse, *reference(s, q, kv_of, rope=(theta, scale)), plan, lse_tol=1e-3)


@pytest.mark.parametrize("packed", [False, True], ids=["bool", "bitpacked"])
def test_custom_mask(device, packed):
    """FlashInfer's flattened layout: a [qo_len, kv_len] block per request (bit-packed: per request)."""
    rng = np.random.default_rng()
    blocks = [rng.random((qo, kv)) < 0.6 for qo, kv in REQUESTS]
    flat = np.concatenate([b.reshape(-1) for b in blocks])
    given = np.concatenate([np.packbits(b.reshape(-1), bitorder="little") for b in blocks]) if packed else flat
    s, q, kv_of, got, lse, plan = run_prefill(V.custom_mask(), device, "split", params={"custom_mask": torch.from_numpy(given)})
    masks = [torch.from_numpy(b)[None] for b in blocks]
    check(s, got, lse, *reference(s, q, kv_of, mask=lambda r, *_: masks[r]), plan)


def test_combined_window_sinks_softcap_ragged(device):
    variant = V.combine(V.sliding_window(5), V.attention_sinks(), V.soft_cap(1.5))
    sinks = torch.randn(BASE["num_qo_heads"])
    s, q, kv_of, got, lse, plan = run_prefill(variant, device, "split", params={"sinks": sinks}, ragged=True)
    ref = reference(s, q, kv_of, sinks=sinks, logits=lambda x, *_: 1.5 * torch.tanh(x / 1.5),
                    mask=lambda r, qo, kv, h: qo - kv <= 5)  # fmt: skip
    check(s, got, lse, *ref, plan)


# ---- user hooks ---------------------------------------------------------------------------------------


def _scale_keys(vals, dim0, request, kv_head, pos, params, key_gain):
    for k in range(8):
        vals[k] *= params[key_gain + request]


def _square_out(vals, dim0, request, qo_head, pos, params, out_gain):
    for k in range(8):
        vals[k] = vals[k] * vals[k] * params[out_gain + request] + 0.25 * (pos % 3)


@pytest.mark.parametrize("split", SPLITS)
def test_user_key_and_output_hooks(device, split):
    """Per-request params and a non-linear output hook that reads the query position: split rows get
    it once, after the merge, with their own request and qo_pos."""
    variant = tilegraph.Variant(
        "user", key_transform=_scale_keys, output_transform=_square_out,
        params={"key_gain": "request", "out_gain": "request"},
    )  # fmt: skip
    key_gain, out_gain = torch.rand(4) + 0.5, torch.rand(4) + 0.5
    s, q, kv_of, got, lse, plan = run_prefill(variant, device, split, params={"key_gain": key_gain, "out_gain": out_gain})
    ref = reference(s, q, kv_of, key_fn=lambda k, r: k * float(key_gain[r]),
                    out_fn=lambda o, r, pos: o * o * float(out_gain[r]) + 0.25 * (pos % 3))  # fmt: skip
    # fp16 on tensor cores: the transformed keys are rounded to fp16 for the mma (2**-11 per element)
    check(s, got, lse, *ref, plan, lse_tol=1e-3)


def test_example_variant_runs_decode_and_prefill(device):
    path = Path(__file__).resolve().parents[2] / "examples" / "custom_variant.py"
    spec = importlib.util.spec_from_file_location("custom_variant_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rates = torch.rand(BASE["num_qo_heads"]) * 0.3
    s, q, kv_of, got, lse, plan = run_prefill(example.distance_decay, device, "split", params={"rate": rates})
    r64 = rates.double()[:, None, None]
    check(s, got, lse, *reference(s, q, kv_of, logits=lambda x, r, qo, kv, h: x - r64 * (qo - kv)), plan)


# ---- parameters, graph protocol, errors ------------------------------------------------------------------


def test_params_buffer_fixed_and_key_names_variant(device):
    settings = tilegraph.Settings(**BASE)
    pre = tilegraph.BatchPrefill(settings, causal=True, variant=V.sliding_window(3), device=device)
    buffer = pre.graph_buffers()["params"]
    assert buffer is pre.params
    pre.set_params({"window_left": 7})
    assert pre.params.data_ptr() == buffer.data_ptr() and float(pre.params[0]) == 7.0
    keys = {tilegraph.BatchPrefill(settings, causal=True, variant=v, device=device).graph_plan_state().key
            for v in (V.DEFAULT, V.soft_cap(), V.soft_cap(), V.sliding_window(4))}  # fmt: skip
    assert len(keys) == 3


def test_variant_errors(device):
    settings = tilegraph.Settings(**BASE)
    with pytest.raises(tilegraph.InputError, match="either variant= or hooks="):
        tilegraph.BatchPrefill(settings, variant=V.soft_cap(), hooks=V.soft_cap().decode_hooks(settings), device=device)
    pre = tilegraph.BatchPrefill(settings, causal=True, variant=V.attention_sinks(), device=device)
    qo_indptr, kv_indptr, pages, last = tables([(2, 4)], 4, 48, np.random.default_rng())
    pre.plan(qo_indptr, kv_indptr, pages, last)
    q = torch.randn(2, 4, 16, dtype=torch.float16, device=device)
    cache = torch.randn(48, 2, 4, 2, 16, dtype=torch.float16, device=device)
    with pytest.raises(tilegraph.InputError, match="needs params"):
        pre.run(q, cache)
    sig = tilegraph.BatchPrefill(settings, causal=True, variant=V.sigmoid_attention(), device=device)
    sig.plan(qo_indptr, kv_indptr, pages, last)
    with pytest.raises(tilegraph.InputError, match="softmax-free"):
        sig.run(q, cache, return_lse=True)
    masked = tilegraph.BatchPrefill(settings, causal=True, variant=V.custom_mask(), device=device)
    masked.plan(qo_indptr, kv_indptr, pages, last)
    with pytest.raises(tilegraph.InputError, match="qo_len x kv_len"):
        masked.set_params({"custom_mask": np.ones(4, bool)})  # one row's bits, the block needs 2 x 4


def test_graph_replay_reads_params_buffer(device):
    """Captured per token bucket with window + sinks; new windows between replays reach the graph
    through the fixed params buffer."""
    settings = tilegraph.Settings(**{**BASE, "num_ctas": 2})
    pre = tilegraph.BatchPrefill(settings, causal=True, variant=V.combine(V.sliding_window(4), V.attention_sinks()), device=device)
    sinks = torch.randn(4)
    pre.set_params({"sinks": sinks})
    cache = torch.randn(48, 2, 4, 2, 16).half().to(device)
    example = {"q": torch.zeros(1, 4, 16, dtype=torch.float16, device=device)}
    runner = tilegraph.GraphRunner(lambda inputs: pre.run(inputs["q"], cache), example, attention=pre, buckets=[8])
    runner.capture_all(show_progress=False)
    rng = np.random.default_rng()
    requests = [(3, 9), (2, 2)]
    for window in (4, 1):
        pre.set_params({"window_left": window})
        qo_indptr, kv_indptr, pages, last = tables(requests, 4, 48, rng)
        q = torch.randn(5, 4, 16).half().to(device)
        out = runner.step({"q": q}, lambda padded: pre.plan(qo_indptr, kv_indptr, pages, last, padded_num_tokens=padded), copy=True)

        def kv_of(r):
            return gather_kv(cache, settings, torch.as_tensor(pages[kv_indptr[r] : kv_indptr[r + 1]]).long(), requests[r][1])

        ref, _ = prefill_variant_reference(q, kv_of, settings, requests, sinks=sinks, mask=lambda r, qo, kv, h: qo - kv <= window)
        assert relative_error(out, ref) < 4e-3, window
    assert runner.stats.replays == 2
