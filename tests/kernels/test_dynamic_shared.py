"""The tensor-core prefill's shared memory: 64-token KV stages at head_dim 128 take more than the
48 KB a CTA may hold statically, so the kernel's K/V words are dynamic shared memory (the launch
passes their size, on the simulator too) and a GPU launch opts the compiled kernel in first."""

from __future__ import annotations

from types import SimpleNamespace

from cuda.bindings import driver as binding

from tilegraph.kernels import primitives as prim
from tilegraph.kernels.launch import opt_in_shared_memory
from tilegraph.kernels.prefill_mma import PrefillMmaConfig, tensor_core_config
from tilegraph.kernels.tuning import (STATIC_SHARED_BYTES, PrefillMmaShape, prefill_mma_score_tokens, prefill_mma_shape,
                                      prefill_mma_short_shape)  # fmt: skip


def test_gpu_shapes_and_their_score_tiles():
    assert prefill_mma_shape(64, simulator=False) == PrefillMmaShape(8, 64, 64)
    assert prefill_mma_shape(128, simulator=False) == PrefillMmaShape(4, 64, 32)  # two S tiles a stage
    assert prefill_mma_shape(256, simulator=False) == PrefillMmaShape(2, 16, 16)
    # the one-warp shapes (short-query plans, BatchDecode's tensor-core engine) keep one-tile stages
    assert prefill_mma_short_shape(128, simulator=False) == PrefillMmaShape(1, 32, 32)
    assert prefill_mma_short_shape(64, simulator=False) == PrefillMmaShape(1, 64, 64)
    assert [prefill_mma_score_tokens(64, hd) for hd in (32, 64, 80, 96, 128, 160, 256)] == [64, 64, 32, 32, 32, 16, 16]
    assert prefill_mma_score_tokens(48, 64) == 48 and prefill_mma_score_tokens(32, 0) == 32


def test_head_dim_128_stages_need_dynamic_shared_memory():
    shape = prefill_mma_shape(128, simulator=False)
    cfg = PrefillMmaConfig(prim.BF16, 128, 4, True, True, warps=shape.warps, kv_tokens=shape.kv_tokens)
    assert cfg.score_block == 32 and cfg.kv_block == 64
    assert cfg.dynamic_shared_bytes == 4 * 64 * 128 * 2 + 2 * 4 * 64 > STATIC_SHARED_BYTES
    assert cfg.shared_bytes == cfg.dynamic_shared_bytes + 2 * 4 * cfg.rows
    short = tensor_core_config(prim.BF16, 128, 8, True, False, short=True)
    assert short.shared_bytes < STATIC_SHARED_BYTES


def test_opt_in_sets_the_driver_attribute_once_per_kernel_and_size():
    calls = []
    compiled = SimpleNamespace(library=SimpleNamespace(get_cufunc=lambda: SimpleNamespace(handle="h", device=SimpleNamespace(id=3))))

    def record(*args):
        calls.append(args)

    attribute = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    opt_in_shared_memory(compiled, 66048, record)
    opt_in_shared_memory(compiled, 66048, record)  # the same kernel and size: once
    opt_in_shared_memory(compiled, 1024, record)  # less than it already has
    assert calls == [(attribute, 66048, "h", 3)]
    opt_in_shared_memory(compiled, 70000, record)  # more
    assert calls[-1] == (attribute, 70000, "h", 3) and len(calls) == 2
