"""Attention variants on decode against float64 references: every built-in, user hooks, split and
unsplit, run-time parameters, graph capture."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import variants as V
from tilegraph.decode import decode_engine_of
from tilegraph.serving.reference import gather_kv, relative_error

TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 1e-4}
BASE = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype="float16", max_batch_size=4, max_num_pages=32)
LENGTHS = [37, 0, 6]  # a long request (split over many CTAs), an empty one, a short one
SPLITS = {"unsplit": 1, "split": 8}


# ---- float64 reference for variants ------------------------------------------------------------


def rope_reference(x: torch.Tensor, pos: torch.Tensor, theta: float, scale: float) -> torch.Tensor:
    """Llama rotate-half RoPE in float64: x [..., D] at positions ``pos`` (broadcast over x[..., 0])."""
    d = x.shape[-1]
    half = d // 2
    inv_freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    angle = (pos.double() / scale)[..., None] * inv_freq
    cos, sin = torch.cos(angle), torch.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def variant_reference(q, cache, settings, table, *, logits=None, mask=None, sinks=None, rope=None,
                      softmax=True, key_fn=None, out_fn=None):  # fmt: skip
    """Decode in float64 with the variant's pieces as torch functions of
    (scores [H, L], request, qo_pos, kv_pos [1, L], qo_head [H, 1]). -> (out [B, H, D], lse [B, H])."""
    kv_indptr, kv_indices, last = (np.asarray(a) for a in table)
    group, heads = settings.group_size, settings.num_qo_heads
    outs, lses = [], []
    for r in range(len(kv_indptr) - 1):
        pages = kv_indices[kv_indptr[r] : kv_indptr[r + 1]]
        kv_len = 0 if len(pages) == 0 else (len(pages) - 1) * settings.page_size + int(last[r])
        k, v = gather_kv(cache, settings, torch.as_tensor(pages, dtype=torch.long), kv_len)
        qr = q[r].double().cpu()
        qo_pos = kv_len - 1
        if rope is not None:
            qr = rope_reference(qr, torch.tensor(float(qo_pos)), *rope)
            k = rope_reference(k, torch.arange(kv_len)[:, None], *rope)
        if key_fn is not None:
            k = key_fn(k, r)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        s = torch.einsum("hd,lhd->hl", qr, k) * settings.sm_scale
        kv_pos, qo_head = torch.arange(kv_len)[None, :], torch.arange(heads)[:, None]
        if logits is not None:
            s = logits(s, r, qo_pos, kv_pos, qo_head)
        keep = mask(r, qo_pos, kv_pos, qo_head) if mask is not None else torch.ones_like(s, dtype=torch.bool)
        if softmax:
            s = s.masked_fill(~keep, float("-inf"))
            cols = s if sinks is None else torch.cat([s, torch.as_tensor(sinks, dtype=torch.float64)[:, None]], 1)
            lse = torch.logsumexp(cols, dim=-1)
            w = torch.exp(s - lse[:, None]).nan_to_num(0.0)
        else:
            lse = torch.zeros(heads, dtype=torch.float64)
            w = s.masked_fill(~keep, 0.0)
        o = torch.einsum("hl,lhd->hd", w, v)
        if out_fn is not None:
            o = out_fn(o, r)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


# ---- helpers ----------------------------------------------------------------------------------------


def page_table(lengths, page_size, pool, rng):
    counts = [-(-n // page_size) for n in lengths]
    pages = rng.permutation(pool)[: sum(counts)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(n - 1) % page_size + 1 if n else 1 for n in lengths], np.int32)
    return torch.from_numpy(indptr), torch.from_numpy(pages), torch.from_numpy(last)


def run_variant(variant, device, split, params=None, lengths=LENGTHS, return_lse=True, **overrides):
    """Plan + run ``variant`` on random inputs; return (settings, q, cache, table, out, lse, plan)."""
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**{**BASE, "num_ctas": SPLITS[split], **overrides})
    table = page_table(lengths, settings.page_size, settings.max_num_pages, rng)
    inner = (settings.page_size, settings.num_kv_heads, settings.head_dim)
    cache = torch.randn(settings.max_num_pages, 2, *inner).to(settings.torch_dtype).to(device)
    q = torch.randn(len(lengths), settings.num_qo_heads, settings.head_dim).to(settings.torch_dtype).to(device)
    dec = tilegraph.BatchDecode(settings, variant=variant, device=device)
    plan = dec.plan(*table)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)  # poisoned
    result = dec.run(q, cache, out=out, return_lse=return_lse, params=params)
    got, lse = result if return_lse else (result, None)
    assert (plan.num_merges > 0) == (split == "split"), plan
    return settings, q, cache, table, got, lse, plan


def check(settings, got, lse, ref_out, ref_lse, plan):
    assert relative_error(got, ref_out) < TOLERANCE[settings.dtype], plan
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert relative_error(lse.cpu()[finite], ref_lse[finite]) < 1e-4, plan
        assert torch.isneginf(lse.cpu()[~finite]).all()


# ---- built-ins ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_soft_cap(device, split):
    cap = 0.7  # small enough to bite: scores of random data reach ~2
    s, q, cache, table, got, lse, plan = run_variant(V.soft_cap(30.0), device, split, params={"logits_soft_cap": cap})
    ref = variant_reference(q, cache, s, table, logits=lambda x, *_: cap * torch.tanh(x / cap))
    check(s, got, lse, *ref, plan)


@pytest.mark.parametrize("split", SPLITS)
def test_sliding_window(device, split):
    window = int(np.random.default_rng().integers(2, 9))
    s, q, cache, table, got, lse, plan = run_variant(V.sliding_window(window), device, split)
    ref = variant_reference(q, cache, s, table, mask=lambda r, qo, kv, h: (qo - kv <= window).expand(s.num_qo_heads, -1))
    check(s, got, lse, *ref, plan)


def test_alibi_default_slopes(device):
    s, q, cache, table, got, lse, plan = run_variant(V.alibi(), device, "split")
    slopes = torch.as_tensor(V.alibi_slopes(s.num_qo_heads), dtype=torch.float64)[:, None]
    ref = variant_reference(q, cache, s, table, logits=lambda x, r, qo, kv, h: x + slopes * (kv - qo))
    check(s, got, lse, *ref, plan)
    np.testing.assert_allclose(V.alibi_slopes(8), [2.0 ** (-i) for i in range(1, 9)])


@pytest.mark.parametrize("split", SPLITS)
def test_attention_sinks(device, split):
    """A sink per head joins each denominator once: unsplit in the tile, split in the merge. The
    empty request gets output 0 and LSE = sink."""
    sinks = torch.randn(BASE["num_qo_heads"]) * 2
    s, q, cache, table, got, lse, plan = run_variant(V.attention_sinks(), device, split, params={"sinks": sinks})
    ref_out, ref_lse = variant_reference(q, cache, s, table, sinks=sinks.double())
    check(s, got, lse, ref_out, ref_lse, plan)
    assert torch.allclose(lse[1].double(), sinks.double(), rtol=1e-6) and (got[1] == 0).all()


@pytest.mark.parametrize("split", SPLITS)
def test_sigmoid_softmax_free(device, split):
    bias = -0.5
    s, q, cache, table, got, _, plan = run_variant(
        V.sigmoid_attention(bias), device, split, return_lse=False, dtype="float32"
    )
    ref_out, _ = variant_reference(q, cache, s, table, logits=lambda x, *_: torch.sigmoid(x + bias), softmax=False)
    check(s, got, None, ref_out, None, plan)


@pytest.mark.parametrize("head_dim", [32, 48])  # 48: 6 lanes, the partner is not a lane xor
def test_rope_on_unrotated_cache(device, head_dim):
    theta, scale = 500.0, 2.0
    s, q, cache, table, got, lse, plan = run_variant(
        V.rope(theta, scale), device, "split", head_dim=head_dim, dtype="float32", lengths=[23, 5]
    )
    ref = variant_reference(q, cache, s, table, rope=(theta, scale))
    check(s, got, lse, *ref, plan)


@pytest.mark.parametrize("packed", [False, True], ids=["bool", "bitpacked"])
def test_custom_mask(device, packed):
    rng = np.random.default_rng()
    rows = [rng.random(n) < 0.6 for n in LENGTHS]
    flat = np.concatenate(rows)
    given = np.concatenate([np.packbits(r, bitorder="little") for r in rows]) if packed else flat
    settings = tilegraph.Settings(**{**BASE, "num_ctas": 8})
    table = page_table(LENGTHS, settings.page_size, settings.max_num_pages, rng)
    cache = torch.randn(settings.max_num_pages, 2, 4, 2, 16).half().to(device)
    q = torch.randn(len(LENGTHS), 4, 16).half().to(device)
    dec = tilegraph.BatchDecode(settings, variant=V.custom_mask(), device=device)
    plan = dec.plan(*table)
    got, lse = dec.run(q, cache, return_lse=True, params={"custom_mask": torch.from_numpy(given)})
    masks = [torch.from_numpy(r)[None, :].expand(4, -1) for r in rows]
    ref = variant_reference(q, cache, settings, table, mask=lambda r, *_: masks[r])
    check(settings, got, lse, *ref, plan)


def test_combined_window_sinks_softcap(device):
    """gpt-oss style: a sliding window with sinks, plus soft-capping, composed into one variant."""
    variant = V.combine(V.sliding_window(5), V.attention_sinks(), V.soft_cap(1.5))
    sinks = torch.randn(BASE["num_qo_heads"])
    s, q, cache, table, got, lse, plan = run_variant(variant, device, "split", params={"sinks": sinks})
    ref = variant_reference(
        q, cache, s, table, sinks=sinks.double(),
        logits=lambda x, *_: 1.5 * torch.tanh(x / 1.5),
        mask=lambda r, qo, kv, h: (qo - kv <= 5).expand(s.num_qo_heads, -1),
    )  # fmt: skip
    check(s, got, lse, *ref, plan)


# ---- user hooks ---------------------------------------------------------------------------------------


def _scale_keys(vals, dim0, request, kv_head, pos, params, key_gain):
    for k in range(8):
        vals[k] *= params[key_gain + request]


def _square_out(vals, dim0, request, qo_head, pos, params, out_gain):
    for k in range(8):
        vals[k] = vals[k] * vals[k] * params[out_gain + request]


# ---- the same variants on BatchDecode's tensor-core engine (g8: the table's choice) ---------------------

TENSOR_CORES = dict(num_qo_heads=8, num_kv_heads=1)


def _mask_window(s, window):
    return lambda r, qo, kv, h: (qo - kv <= window).expand(s.num_qo_heads, -1)


@pytest.mark.parametrize("name", ["soft_cap", "window", "alibi", "sinks", "window_sinks_softcap", "custom_mask"])
def test_variants_on_tensor_cores(device, name):
    """Each hook kind through the one-token prefill plan and the tensor-core kernel, split, vs float64."""
    sinks = torch.randn(8) * 2
    variants = {
        "soft_cap": (V.soft_cap(0.7), {}, dict(logits=lambda x, *_: 0.7 * torch.tanh(x / 0.7))),
        "window": (V.sliding_window(5), {}, None),
        "alibi": (V.alibi(), {}, None),
        "sinks": (V.attention_sinks(), {"sinks": sinks}, dict(sinks=sinks.double())),
        "window_sinks_softcap": (V.combine(V.sliding_window(5), V.attention_sinks(), V.soft_cap(1.5)), {"sinks": sinks},
                                 dict(sinks=sinks.double(), logits=lambda x, *_: 1.5 * torch.tanh(x / 1.5))),
        "custom_mask": (V.custom_mask(), None, None),
    }  # fmt: skip
    variant, params, ref_kwargs = variants[name]
    rows = [np.random.default_rng().random(n) < 0.6 for n in LENGTHS]
    if name == "custom_mask":
        params = {"custom_mask": torch.from_numpy(np.concatenate(rows))}
    s, q, cache, table, got, lse, plan = run_variant(variant, device, "split", params=params, **TENSOR_CORES)
    assert s.decode_engine == "auto" and decode_engine_of(s) == "tensor_cores"
    assert hasattr(plan, "tile_rows"), plan  # a one-token prefill plan
    if name in ("window", "window_sinks_softcap"):
        ref_kwargs = {**(ref_kwargs or {}), "mask": _mask_window(s, 5)}
    elif name == "alibi":
        slopes = torch.as_tensor(V.alibi_slopes(8), dtype=torch.float64)[:, None]
        ref_kwargs = dict(logits=lambda x, r, qo, kv, h: x + slopes * (kv - qo))
    elif name == "custom_mask":
        masks = [torch.from_numpy(r)[None, :].expand(8, -1) for r in rows]
        ref_kwargs = dict(mask=lambda r, *_: masks[r])
    check(s, got, lse, *variant_reference(q, cache, s, table, **ref_kwargs), plan)


def test_user_key_and_output_hooks_with_request_params(device):
    """Per-request params; the output transform is non-linear, so applying it to split partials
    (instead of after the merge) would fail."""
    variant = tilegraph.Variant(
        "user", key_transform=_scale_keys, output_transform=_square_out,
        params={"key_gain": "request", "out_gain": "request"},
    )  # fmt: skip
    key_gain, out_gain = torch.rand(3) + 0.5, torch.rand(3) + 0.5
    s, q, cache, table, got, lse, plan = run_variant(
        variant, device, "split", params={"key_gain": key_gain, "out_gain": out_gain}
    )
    ref = variant_reference(
        q, cache, s, table, key_fn=lambda k, r: k * float(key_gain[r]), out_fn=lambda o, r: o * o * float(out_gain[r])
    )
    check(s, got, lse, *ref, plan)


def test_example_distance_decay(device):
    path = Path(__file__).resolve().parents[2] / "examples" / "custom_variant.py"
    spec = importlib.util.spec_from_file_location("custom_variant_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rates = torch.rand(BASE["num_qo_heads"]) * 0.3
    s, q, cache, table, got, lse, plan = run_variant(example.distance_decay, device, "split", params={"rate": rates})
    r64 = rates.double()[:, None]
    ref = variant_reference(q, cache, s, table, logits=lambda x, r, qo, kv, h: x - r64 * (qo - kv))
    check(s, got, lse, *ref, plan)


# ---- parameters, identity, graphs ----------------------------------------------------------------


def test_params_persist_and_change_without_recompiling(device):
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**{**BASE, "num_ctas": 2})
    table = page_table([13], 4, 32, rng)
    cache = torch.randn(32, 2, 4, 2, 16).half().to(device)
    q = torch.randn(1, 4, 16).half().to(device)
    dec = tilegraph.BatchDecode(settings, variant=V.sliding_window(3), device=device)
    dec.plan(*table)
    kernels_before = dec.config
    for window in (3, 7, -1):
        if window != 3:
            dec.set_params({"window_left": window})
        got = dec.run(q, cache)
        keep = (lambda r, qo, kv, h: (qo - kv <= window).expand(4, -1)) if window >= 0 else None
        ref, _ = variant_reference(q, cache, settings, table, mask=keep)
        assert relative_error(got, ref) < 4e-3, window
    assert dec.config is kernels_before and dec.params.data_ptr() == dec.graph_buffers()["params"].data_ptr()


def test_variant_identity_in_plan_key(device):
    settings = tilegraph.Settings(**BASE)
    keys = {tilegraph.BatchDecode(settings, variant=v, device=device).graph_plan_state().key
            for v in (V.DEFAULT, V.soft_cap(), V.soft_cap(), V.sliding_window(4))}  # fmt: skip
    assert len(keys) == 3  # the two soft_caps are the same variant
    # the key follows the hook's code: a changed constant is another variant
    a = tilegraph.Variant("v", logits_transform=lambda s, r, qp, kp, qh, kh, p: s * 0.5)
    b = tilegraph.Variant("v", logits_transform=lambda s, r, qp, kp, qh, kh, p: s * 0.25)
    assert a.key != b.key


def test_graph_capture_with_variant(device):
    settings = tilegraph.Settings(**{**BASE, "num_ctas": 4, "graphs": {"batch_sizes": [2, 4]}})
    dec = tilegraph.BatchDecode(settings, variant=V.combine(V.sliding_window(4), V.attention_sinks()), device=device)
    sinks = torch.randn(4)
    dec.set_params({"sinks": sinks})
    cache = torch.randn(32, 2, 4, 2, 16).half().to(device)

    def forward(inputs):
        return dec.run(inputs["q"], cache)

    runner = tilegraph.GraphRunner(forward, {"q": torch.zeros(1, 4, 16, dtype=torch.float16, device=device)}, attention=dec)
    runner.capture_all(show_progress=False)
    with pytest.raises(tilegraph.StateError):
        dec.graph_set_capturing(True)
        try:
            dec.set_params({"sinks": sinks})
        finally:
            dec.graph_set_capturing(False)
    rng = np.random.default_rng()
    for window in (4, 1):
        dec.set_params({"window_left": window})  # between replays: the graph reads the fixed buffer
        table = page_table([11, 3, 0], 4, 32, rng)
        q = torch.randn(3, 4, 16).half().to(device)
        got = runner.run({"q": q}, *table, copy=True)
        ref, _ = variant_reference(q, cache, settings, table, sinks=sinks.double(),
                                   mask=lambda r, qo, kv, h: (qo - kv <= window).expand(4, -1))  # fmt: skip
        assert relative_error(got, ref) < 4e-3, window


def test_builtins_compose_with_distinct_fingerprints():
    parts = [V.soft_cap(), V.sliding_window(1), V.alibi(), V.attention_sinks(), V.rope(), V.custom_mask()]
    assert len({v.key for v in parts}) == len(parts)
    combo = V.combine(*parts)
    assert set(combo.input_names) >= {"logits_soft_cap", "window_left", "alibi_slopes", "sinks", "custom_mask"}
    assert combo.key.startswith("soft_cap+sliding_window+alibi+sinks+rope+custom_mask#")


SCALE = 0.5


def _scaled(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
    return score * SCALE


def test_specializations_shared_and_keys_follow_globals(device, monkeypatch):
    settings = tilegraph.Settings(**BASE)
    a = tilegraph.BatchDecode(settings, variant=V.soft_cap(), device=device)
    b = tilegraph.BatchDecode(settings, variant=V.soft_cap(), device=device)
    assert a.config == b.config  # equal variants: one compiled specialization (kernel caches hit)
    key = tilegraph.Variant("scaled", logits_transform=_scaled).key
    monkeypatch.setitem(globals(), "SCALE", 0.25)
    assert tilegraph.Variant("scaled", logits_transform=_scaled).key != key  # a global it reads changed


def test_compile_time_recorded(device):
    s, *_ = run_variant(V.soft_cap(), device, "unsplit")
    labels = [label for label in V.COMPILE_SECONDS if "soft_cap#" in label]
    assert labels and all(V.COMPILE_SECONDS[label] >= 0.0 for label in labels)
