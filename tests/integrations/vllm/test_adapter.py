"""The vLLM adapter's classes on hand-built vLLM metadata (simulator): builder -> plan inputs, the
slot writer, forward vs a float64 reference (mixed prefill / decode / chunked rows, padding rows and
tokens), the refusals. Skipped where vLLM is not installed (it lives in its own environment)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata  # noqa: E402

from tilegraph.errors import InputError  # noqa: E402
from tilegraph.integrations.vllm import objects  # noqa: E402
from tilegraph.integrations.vllm.builder import TilegraphMetadataBuilder  # noqa: E402
from tilegraph.integrations.vllm.impl import TilegraphImpl  # noqa: E402
from tilegraph.serving.reference import relative_error  # noqa: E402

HQ, HKV, D, BLOCK, NUM_BLOCKS = 4, 2, 32, 16, 10
# (query tokens, seq_len): prefill, decode, chunked prefill, a padded request row
ROWS = [(5, 5), (1, 37), (4, 20), (0, 0)]
PAD_TOKENS = 3  # tokens past the last request (vLLM pads num_actual_tokens)


def _step(seed: int):
    gen = torch.Generator().manual_seed(seed)
    qo = torch.tensor([r[0] for r in ROWS])
    seq = torch.tensor([r[1] for r in ROWS], dtype=torch.int32)
    qsl = torch.zeros(len(ROWS) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(qo, 0)
    blocks = torch.randperm(NUM_BLOCKS, generator=gen).to(torch.int32)
    table = torch.full((len(ROWS), 4), 99, dtype=torch.int32)  # 99: never read (past each row's blocks)
    table[0, :1], table[1, :3], table[2, :2] = blocks[0:1], blocks[1:4], blocks[4:6]
    slots = []
    for r, (q, s) in enumerate(ROWS):
        for pos in range(s - q, s):
            slots.append(int(table[r, pos // BLOCK]) * BLOCK + pos % BLOCK)
    slot_mapping = torch.tensor(slots + [-1] * PAD_TOKENS, dtype=torch.int64)
    tokens = int(qsl[-1]) + PAD_TOKENS
    meta = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=len(ROWS),
        num_actual_tokens=tokens, max_query_len=int(qo.max()), max_seq_len=int(seq.max()),
        block_table_tensor=table, slot_mapping=slot_mapping,
    )  # fmt: skip
    return meta, gen


def _builder() -> TilegraphMetadataBuilder:
    return TilegraphMetadataBuilder(SimpleNamespace(block_size=BLOCK), ["l0"], None, torch.device("cpu"))


def _impl(**features) -> TilegraphImpl:
    return TilegraphImpl(HQ, D, 1 / math.sqrt(D), HKV, features.pop("alibi_slopes", None), features.pop("sliding_window", None), "auto", **features)


def test_builder_page_table():
    meta, _ = _step(0)
    built = _builder().build(0, meta)
    table = meta.block_table_tensor
    assert built.num_actual_tokens == 10
    np.testing.assert_array_equal(built.table.qo_indptr, [0, 5, 6, 10, 10])
    np.testing.assert_array_equal(built.table.kv_indptr, [0, 1, 4, 6, 6])
    np.testing.assert_array_equal(built.table.kv_indices, torch.cat([table[0, :1], table[1, :3], table[2, :2]]).numpy())
    np.testing.assert_array_equal(built.table.kv_last_page_len[:3], [5, 5, 4])
    assert built.step != _builder().build(0, meta).step  # a new plan key every step


def test_builder_refuses_query_past_seq_len():
    meta, _ = _step(0)
    meta.seq_lens = meta.seq_lens.clone()
    meta.seq_lens[1] = 0
    with pytest.raises(InputError, match="request 1"):
        _builder().build(0, meta)


def _cache(gen) -> torch.Tensor:
    """vLLM's per-layer cache, logical [blocks, kv_heads, block, 2D], physically block/token/head (LBNHC)."""
    return torch.randn(NUM_BLOCKS, BLOCK, HKV, 2 * D, generator=gen).permute(0, 2, 1, 3)


def test_slot_writer_writes_real_rows_only():
    meta, gen = _step(1)
    cache = _cache(gen)
    before = cache.clone()
    key = torch.randn(meta.num_actual_tokens, HKV, D, generator=gen)
    value = torch.randn(meta.num_actual_tokens, HKV, D, generator=gen)
    _impl().do_kv_cache_update(None, key, value, cache, meta.slot_mapping)
    written = torch.zeros(NUM_BLOCKS, BLOCK, dtype=torch.bool)
    for row, slot in enumerate(meta.slot_mapping.tolist()):
        if slot < 0:
            continue
        page, off = divmod(slot, BLOCK)
        written[page, off] = True
        assert torch.equal(cache[page, :, off, :D], key[row]) and torch.equal(cache[page, :, off, D:], value[row])
    untouched = ~written[:, None, :, None].expand_as(cache)
    assert torch.equal(cache[untouched], before[untouched])


SINKS = torch.tensor([0.5, -1.0, 2.0, 0.0])
SLOPES = [0.5, 0.25, 0.125, 0.0625]


def _reference(query, cache, meta, window=None, cap=0.0, sinks=None, alibi=None):
    out = torch.zeros(query.shape[0], HQ, D, dtype=torch.float64)
    qsl = meta.query_start_loc_cpu.tolist()
    for r, (q_len, s) in enumerate(ROWS):
        if q_len == 0:
            continue
        pages = meta.block_table_tensor[r, : -(-s // BLOCK)].long()
        kv = cache[pages].permute(0, 2, 1, 3).reshape(-1, HKV, 2 * D)[:s].double()
        k = kv[..., :D].repeat_interleave(HQ // HKV, 1)
        v = kv[..., D:].repeat_interleave(HQ // HKV, 1)
        q = query[qsl[r] : qsl[r + 1]].double()
        scores = torch.einsum("nhd,lhd->hnl", q, k) / math.sqrt(D)
        if cap:
            scores = cap * torch.tanh(scores / cap)
        qpos = torch.arange(s - q_len, s)[:, None]
        kpos = torch.arange(s)[None, :]
        if alibi is not None:  # vLLM: slope * (key position - query position), after the scale
            scores = scores + torch.tensor(alibi, dtype=torch.float64)[:, None, None] * (kpos - qpos)
        masked = kpos > qpos
        if window is not None:
            masked |= kpos <= qpos - window
        scores = scores.masked_fill(masked, float("-inf"))
        if sinks is not None:  # one extra logit per head in the softmax's denominator (vLLM's s_aux)
            sink = sinks.double()[:, None, None].expand(-1, scores.shape[1], 1)
            weights = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        else:
            weights = torch.softmax(scores, -1)
        out[qsl[r] : qsl[r + 1]] = torch.einsum("hnl,lhd->nhd", weights, v)
    return out


@pytest.mark.parametrize(
    "features",
    [{}, {"sliding_window": 6, "logits_soft_cap": 2.0}, {"sinks": SINKS, "alibi_slopes": SLOPES}],
    ids=["plain", "window+softcap", "sinks+alibi"],
)
def test_forward_matches_reference(features):
    objects.clear()
    meta, gen = _step(2)
    built = _builder().build(0, meta)
    cache = _cache(gen)
    query = torch.randn(meta.num_actual_tokens, HQ, D, generator=gen)
    output = torch.full((meta.num_actual_tokens, HQ * D), float("nan"))
    _impl(**features).forward(None, query, None, None, cache, built, output)
    expected = _reference(query, cache, meta, features.get("sliding_window"), features.get("logits_soft_cap", 0.0), features.get("sinks"), features.get("alibi_slopes"))
    assert relative_error(output.view(-1, HQ, D), expected) < 1e-5
    assert torch.equal(output[10:], torch.zeros_like(output[10:]))  # padding tokens: 0
    if features:  # the features matter: the plain reference differs
        assert relative_error(output.view(-1, HQ, D), _reference(query, cache, meta)) > 1e-2


def test_layers_share_one_plan_per_step():
    objects.clear()
    meta, gen = _step(3)
    built = _builder().build(0, meta)
    cache = _cache(gen)
    query = torch.randn(meta.num_actual_tokens, HQ, D, generator=gen)
    layers = [_impl(), _impl()]
    outs = [torch.empty(meta.num_actual_tokens, HQ * D) for _ in layers]
    for layer, out in zip(layers, outs):
        layer.forward(None, query, None, None, cache, built, out)
    (held,) = objects._HELD.values()
    assert held.step == built.step
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"),
        (dict(attn_type=AttentionType.ENCODER_DECODER), "attn_type"),
        (dict(attn_type=AttentionType.ENCODER_ONLY), "attn_type"),
        (dict(kv_sharing_target_layer_name="model.layers.0.attn"), "kv_sharing_target_layer_name"),
    ],
)
def test_refused_at_construction(kwargs, named):
    args = dict(num_heads=HQ, head_size=D, scale=0.1, num_kv_heads=HKV, alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
    args.update(kwargs)
    with pytest.raises(InputError, match=named):
        TilegraphImpl(**args)


def test_version_range_checked():
    from tilegraph.integrations.vllm.version import check_vllm_version

    check_vllm_version("0.32.0")
    check_vllm_version("0.32.1+cpu")
    for bad in ("0.31.9", "0.33.0", "1.0.0"):
        with pytest.raises(InputError, match=bad):
            check_vllm_version(bad)
