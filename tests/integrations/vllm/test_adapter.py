"""The vLLM adapter's classes on hand-built vLLM metadata (simulator): builder -> host lengths and a
plan on the device block table, the slot writer, forward vs a float64 reference (mixed prefill /
decode / chunked rows on BatchPrefill, uniform decode steps on BatchDecode, padding rows and tokens),
build_for_cudagraph_capture, the refusals. Skipped where vLLM is not installed (it lives in its own environment)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tilegraph

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata  # noqa: E402

from tilegraph.decode import BatchDecode  # noqa: E402
from tilegraph.errors import InputError  # noqa: E402
from tilegraph.prefill import BatchPrefill  # noqa: E402
from tilegraph.integrations.vllm import objects  # noqa: E402
from tilegraph.integrations.vllm.builder import TilegraphMetadataBuilder  # noqa: E402
from tilegraph.integrations.vllm.impl import TilegraphImpl  # noqa: E402
from tilegraph.serving.reference import relative_error  # noqa: E402

HQ, HKV, D, BLOCK, NUM_BLOCKS = 4, 2, 32, 16, 10
# (query tokens, seq_len): prefill, decode, chunked prefill, a padded request row
ROWS = [(5, 5), (1, 37), (4, 20), (0, 0)]
PAD_TOKENS = 3  # tokens past the last request (vLLM pads num_actual_tokens)


# a decode step: three one-token requests, then vLLM's CUDA-graph padding (no token, seq_len 0)
DECODE_ROWS = [(1, 5), (1, 37), (1, 20), (0, 0)]


def _step(seed: int, rows=ROWS, pad_tokens: int = PAD_TOKENS):
    gen = torch.Generator().manual_seed(seed)
    qo = torch.tensor([r[0] for r in rows])
    seq = torch.tensor([r[1] for r in rows], dtype=torch.int32)
    qsl = torch.zeros(len(rows) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(qo, 0)
    blocks = torch.randperm(NUM_BLOCKS, generator=gen).to(torch.int32)
    table = torch.full((len(rows), 4), 99, dtype=torch.int32)  # 99: never read (past each row's blocks)
    table[0, :1], table[1, :3], table[2, :2] = blocks[0:1], blocks[1:4], blocks[4:6]
    slots = []
    for r, (q, s) in enumerate(rows):
        for pos in range(s - q, s):
            slots.append(int(table[r, pos // BLOCK]) * BLOCK + pos % BLOCK)
    slot_mapping = torch.tensor(slots + [-1] * pad_tokens, dtype=torch.int64)
    tokens = int(qsl[-1]) + pad_tokens
    meta = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=len(rows),
        num_actual_tokens=tokens, max_query_len=int(qo.max()), max_seq_len=int(seq.max()),
        block_table_tensor=table, slot_mapping=slot_mapping,
    )  # fmt: skip
    return meta, gen


def _builder() -> TilegraphMetadataBuilder:
    return TilegraphMetadataBuilder(SimpleNamespace(block_size=BLOCK), ["l0"], None, torch.device("cpu"))


def _impl(**features) -> TilegraphImpl:
    return TilegraphImpl(HQ, D, 1 / math.sqrt(D), HKV, features.pop("alibi_slopes", None), features.pop("sliding_window", None), "auto", **features)


def test_builder_plans_on_the_device_block_table():
    objects.clear()
    meta, _ = _step(0)
    built = _builder().build(0, meta)
    assert built.num_actual_tokens == 10 and not built.decode
    np.testing.assert_array_equal(built.lengths.qo_indptr, [0, 5, 6, 10, 10])
    np.testing.assert_array_equal(built.lengths.seq_lens, [5, 37, 20, 0])
    assert built.lengths.page_refs == 6
    assert built.block_table is meta.block_table_tensor  # the table itself, never copied
    assert built.step != _builder().build(0, meta).step  # a new plan key every step


def test_builder_reads_host_lengths_only():
    """seq_lens on the meta device (no data): the builder plans from seq_lens_cpu_upper_bound."""
    meta, _ = _step(0)
    meta.seq_lens_cpu_upper_bound = meta.seq_lens.clone()
    meta.seq_lens = torch.empty(meta.seq_lens.shape, dtype=torch.int32, device="meta")
    built = _builder().build(0, meta)
    np.testing.assert_array_equal(built.lengths.seq_lens, [5, 37, 20, 0])
    meta.seq_lens_cpu_upper_bound = None
    with pytest.raises(InputError, match="seq_lens_cpu_upper_bound"):
        _builder().build(0, meta)


def test_builder_refuses_speculative_decoding():
    with pytest.raises(InputError, match="speculative_config"):
        TilegraphMetadataBuilder(SimpleNamespace(block_size=BLOCK), ["l0"], SimpleNamespace(speculative_config=object()), torch.device("cpu"))


def test_decode_steps_and_padding_are_uniform_decode():
    meta, _ = _step(0, DECODE_ROWS, pad_tokens=1)
    built = _builder().build(0, meta)
    assert built.decode and built.num_reqs == 4 and built.num_actual_tokens == 3
    assert built.lengths.decode_rows == 3
    meta.seq_lens = meta.seq_lens.clone()
    meta.seq_lens[3] = 4  # a request with KV but no query token: not padding, so not a decode step
    assert not _builder().build(0, meta).decode


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


def _reference(query, cache, meta, window=None, cap=0.0, sinks=None, alibi=None, rows=ROWS):
    out = torch.zeros(query.shape[0], HQ, D, dtype=torch.float64)
    qsl = meta.query_start_loc_cpu.tolist()
    for r, (q_len, s) in enumerate(rows):
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
@pytest.mark.parametrize("rows, kind", [(ROWS, BatchPrefill), (DECODE_ROWS, BatchDecode)], ids=["mixed", "decode"])
def test_forward_matches_reference(features, rows, kind):
    objects.clear()
    meta, gen = _step(2, rows)
    built = _builder().build(0, meta)
    cache = _cache(gen)
    query = torch.randn(meta.num_actual_tokens, HQ, D, generator=gen)
    output = torch.full((meta.num_actual_tokens, HQ * D), float("nan"))
    _impl(**features).forward(None, query, None, None, cache, built, output)
    (held,) = objects._HELD.values()
    assert isinstance(held.attention, kind)
    assert held.attention.page_table is meta.block_table_tensor  # the kernels read vLLM's table in place
    expected = _reference(query, cache, meta, features.get("sliding_window"), features.get("logits_soft_cap", 0.0),
                          features.get("sinks"), features.get("alibi_slopes"), rows)  # fmt: skip
    real = built.num_actual_tokens
    assert relative_error(output.view(-1, HQ, D)[:real], expected[:real]) < 1e-5
    assert torch.equal(output[real + 1 :], torch.zeros_like(output[real + 1 :]))  # padding tokens past the requests: 0
    if kind is BatchPrefill:
        assert torch.equal(output[real:], torch.zeros_like(output[real:]))
    if features:  # the features matter: the plain reference differs
        assert relative_error(output.view(-1, HQ, D)[:real], _reference(query, cache, meta, rows=rows)[:real]) > 1e-2


def test_builder_supports_uniform_decode_cuda_graphs():
    assert TilegraphMetadataBuilder.get_cudagraph_support(None, None) is AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


def test_build_for_cudagraph_capture_plans_the_decode_object():
    """After one eager decode step the capture build plans the layer's BatchDecode itself (a captured
    forward must not plan); a step of other lengths replans it on the same table, same object."""
    objects.clear()
    builder, layer = _builder(), _impl()
    meta, gen = _step(4, DECODE_ROWS, pad_tokens=1)
    cache = _cache(gen)
    query = torch.randn(meta.num_actual_tokens, HQ, D, generator=gen)
    layer.forward(None, query, None, None, cache, builder.build(0, meta), torch.empty(meta.num_actual_tokens, HQ * D))
    (held,) = objects._HELD.values()
    attention = held.attention
    captured = builder.build_for_cudagraph_capture(meta)
    assert captured.decode and held.step == captured.step  # planned by the builder, before any forward
    meta.seq_lens = meta.seq_lens.clone()
    meta.seq_lens[:3] = torch.tensor([7, 33, 17], dtype=torch.int32)
    replay = builder.build(0, meta)
    assert held.step == replay.step and held.attention is attention and attention.page_table is meta.block_table_tensor
    output = torch.full((meta.num_actual_tokens, HQ * D), float("nan"))
    layer.forward(None, query, None, None, cache, replay, output)
    expected = _reference(query, cache, meta, rows=[(1, 7), (1, 33), (1, 17), (0, 0)])
    assert relative_error(output.view(-1, HQ, D)[:3], expected[:3]) < 1e-5
    mixed, _ = _step(4)
    with pytest.raises(InputError, match="uniform single-token decode"):
        builder.build_for_cudagraph_capture(mixed)


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


def test_decode_graph_replays_new_lengths_and_block_table():
    """vLLM's discipline on the simulated graph: one eager decode step, a capture of the layer on
    build_for_cudagraph_capture's metadata, then a step with other lengths and other page ids written
    into the SAME block table, planned by the builder only: the replay matches the reference."""
    objects.clear()
    builder, layer = _builder(), _impl()
    meta, gen = _step(5, DECODE_ROWS, pad_tokens=1)
    cache = _cache(gen)
    query = torch.randn(meta.num_actual_tokens, HQ, D, generator=gen)
    output = torch.full((meta.num_actual_tokens, HQ * D), float("nan"))
    layer.forward(None, query, None, None, cache, builder.build(0, meta), output)  # vLLM's warm-up run
    graph = tilegraph.SimulatedGraph()
    captured = builder.build_for_cudagraph_capture(meta)
    with graph.capture():
        layer.forward(None, query, None, None, cache, captured, output)
    assert graph.num_kernel_launches >= 1
    rows = [(1, 20), (1, 50), (1, 3), (0, 0)]
    blocks = torch.randperm(NUM_BLOCKS, generator=gen).to(torch.int32)
    table = meta.block_table_tensor
    table[0, :2], table[1, :4], table[2, :1] = blocks[0:2], blocks[2:6], blocks[6:7]  # in place: the captured address
    meta.seq_lens = torch.tensor([r[1] for r in rows], dtype=torch.int32)
    query.copy_(torch.randn(query.shape, generator=gen))
    output.fill_(float("nan"))
    builder.build(0, meta)  # plans and uploads; the layer's Python does not run at replay
    graph.replay()
    expected = _reference(query, cache, meta, rows=rows)
    assert relative_error(output.view(-1, HQ, D)[:3], expected[:3]) < 1e-5
