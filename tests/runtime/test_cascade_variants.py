"""CascadeAttention with attention variants against the float64 flat reference with the same variant
over the concatenated KV (positions: flat kv positions across levels, qo_pos = total kv_len - qo_len
+ i), split and unsplit; sinks join each row's denominator once; softmax-free levels are summed;
output transforms, the custom mask and per-request parameters are refused."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import variants as V
from tilegraph.cascade import CascadeAttention
from tilegraph.errors import InputError
from tilegraph.serving.reference import gather_kv, relative_error

sys.path.insert(0, str(Path(__file__).parent))
from test_cascade import build_levels, make_cache  # noqa: E402
from test_prefill_variants import prefill_variant_reference  # noqa: E402

TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 1e-4}
BASE = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, max_batch_size=8, max_num_pages=160,
            max_num_tokens=32, dtype="float16")  # fmt: skip
SPLITS = {"unsplit": 1, "split": 8}
# (requests [(qo_len, suffix_len)], shared levels [[(requests, prefix_len)]]): a group of two sharing a
# long prefix, a decode row, a request without prefix; and three levels with an empty suffix row
LAYOUTS = {
    "two_levels": ([(3, 6), (1, 33), (4, 5)], [[(2, 61), (1, 0)]]),
    "three_levels": ([(2, 3), (1, 1), (3, 9), (1, 4)], [[(3, 54), (1, 6)], [(1, 7), (2, 45), (1, 0)]]),
}


def run_cascade(variant, device, split, layout, params=None, causal=True, return_lse=True, **overrides):
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**{**BASE, "num_ctas": SPLITS[split], **overrides})
    requests, prefix_levels = LAYOUTS[layout]
    tables, seen = build_levels(requests, prefix_levels, settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device)
    rows = sum(qo for qo, _ in requests)
    q = torch.randn(rows, settings.num_qo_heads, settings.head_dim).to(settings.torch_dtype).to(device)
    cascade = CascadeAttention(settings, num_levels=len(tables), causal=causal, device=device, variant=variant)
    plan = cascade.plan(tables)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)  # poisoned
    result = cascade.run(q, cache, out=out, return_lse=return_lse, params=params)
    got, lse = result if return_lse else (result, None)
    if split == "split":
        assert any(p.num_merges > 0 for p in plan.levels), plan

    def kv_of(r):
        parts = [gather_kv(cache, settings, torch.as_tensor(pages, dtype=torch.long), kv_len) for pages, kv_len in seen[r]]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    flat = [(qo, sum(kv for _, kv in seen[r])) for r, (qo, _) in enumerate(requests)]
    return settings, q, kv_of, flat, got, lse, plan


def check(settings, got, lse, ref_out, ref_lse, plan):
    assert not torch.isnan(got.cpu()).any(), plan
    assert relative_error(got, ref_out) < TOLERANCE[settings.dtype], plan
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert relative_error(lse.cpu()[finite], ref_lse[finite]) < 1e-4, plan
        assert torch.isneginf(lse.cpu()[~finite]).all(), plan


def reference(settings, q, kv_of, flat, causal=True, **pieces):
    return prefill_variant_reference(q, kv_of, settings, flat, causal=causal, **pieces)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", SPLITS)
def test_soft_cap_and_sinks(device, split, layout):
    """Only the last level applies the sink: it joins each row's denominator exactly once."""
    cap, sinks = 0.7, torch.randn(BASE["num_qo_heads"]) * 2
    variant = V.combine(V.soft_cap(30.0), V.attention_sinks())
    s, q, kv_of, flat, got, lse, plan = run_cascade(variant, device, split, layout,
                                                    params={"logits_soft_cap": cap, "sinks": sinks})  # fmt: skip
    check(s, got, lse, *reference(s, q, kv_of, flat, logits=lambda x, *_: cap * torch.tanh(x / cap), sinks=sinks), plan)


@pytest.mark.parametrize("split", SPLITS)
def test_sinks_non_causal(device, split):
    sinks = torch.randn(BASE["num_qo_heads"]) * 2
    s, q, kv_of, flat, got, lse, plan = run_cascade(V.attention_sinks(), device, split, "three_levels",
                                                    params={"sinks": sinks}, causal=False)  # fmt: skip
    check(s, got, lse, *reference(s, q, kv_of, flat, causal=False, sinks=sinks), plan)


@pytest.mark.parametrize("split", SPLITS)
def test_alibi_flat_positions(device, split):
    s, q, kv_of, flat, got, lse, plan = run_cascade(V.alibi(), device, split, "three_levels")
    slopes = torch.as_tensor(V.alibi_slopes(s.num_qo_heads), dtype=torch.float64)[:, None, None]
    check(s, got, lse, *reference(s, q, kv_of, flat, logits=lambda x, r, qo, kv, h: x + slopes * (kv - qo)), plan)


@pytest.mark.parametrize("split", SPLITS)
def test_sliding_window_across_levels(device, split):
    window = 9  # reaches from the suffix back into the prefix levels, not to their start
    s, q, kv_of, flat, got, lse, plan = run_cascade(V.sliding_window(window), device, split, "two_levels")
    check(s, got, lse, *reference(s, q, kv_of, flat, mask=lambda r, qo, kv, h: qo - kv <= window), plan)


@pytest.mark.parametrize("split", SPLITS)
def test_rope_flat_positions(device, split):
    theta, scale = 500.0, 2.0
    s, q, kv_of, flat, got, lse, plan = run_cascade(V.rope(theta, scale), device, split, "three_levels", dtype="float32")
    check(s, got, lse, *reference(s, q, kv_of, flat, rope=(theta, scale)), plan)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", SPLITS)
def test_sigmoid_levels_summed(device, split, layout):
    bias = -0.5
    s, q, kv_of, flat, got, _, plan = run_cascade(V.sigmoid_attention(bias), device, split, layout,
                                                  return_lse=False, dtype="float32")  # fmt: skip
    ref_out, _ = reference(s, q, kv_of, flat, logits=lambda x, *_: torch.sigmoid(x + bias), softmax=False)
    check(s, got, None, ref_out, None, plan)


def test_sigmoid_refuses_lse(device):
    with pytest.raises(InputError, match="softmax-free"):
        run_cascade(V.sigmoid_attention(), device, "unsplit", "two_levels", return_lse=True, dtype="float32")


def _out_gain(vals, dim0, request, qo_head, pos, params, gain):
    for k in range(8):
        vals[k] *= params[gain]


@pytest.mark.parametrize(
    "variant, what",
    [
        (V.custom_mask(), "custom mask"),
        (tilegraph.Variant("outhook", output_transform=_out_gain, params={"gain": "scalar"}), "output transform"),
        (tilegraph.Variant("per_request", output_transform=None, params={"g": "request"}), "per-request"),
    ],
    ids=["custom_mask", "output_transform", "per_request_param"],
)
def test_refused_variants(device, variant, what):
    settings = tilegraph.Settings(**{**BASE, "num_ctas": 1})
    with pytest.raises(InputError, match=what):
        CascadeAttention(settings, num_levels=2, device=device, variant=variant)


def test_default_behaviour_without_variant_is_unchanged(device):
    settings = tilegraph.Settings(**{**BASE, "num_ctas": 2})
    cascade = CascadeAttention(settings, num_levels=2, device=device)
    assert all(level.positions is None for level in cascade.levels)
    with pytest.raises(InputError, match="no variant"):
        cascade.set_params({"x": 1.0})
