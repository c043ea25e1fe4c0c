"""Each primitive in a tiny kernel (``tilegraph.kernels.selftest``) against numpy / torch references.

Runs on the simulator (CPU tensors) or, on a GPU machine, on the GPU; simulator-only behaviour
(alignment errors, the full-warp requirement of mma) is skipped there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.kernels import selftest as st
from tilegraph.kernels.primitives import BF16, F16, F32

sim_only = pytest.mark.skipif(
    not tilegraph.SIMULATOR, reason="simulator-only behaviour (undefined or a sticky context error on a GPU)"
)


def _f32(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _dev(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _halves(words: np.ndarray) -> np.ndarray:
    """int32 [n] -> uint16 [2n]: low half first."""
    u = words.view(np.uint32)
    return np.stack([u & 0xFFFF, u >> 16], axis=1).reshape(-1).astype(np.uint16)


def _is_nan_bits(bits: np.ndarray, kind: int) -> np.ndarray:
    exp, man = (0x7C00, 0x03FF) if kind == F16 else (0x7F80, 0x007F)
    return ((bits & exp) == exp) & ((bits & man) != 0)


# ---- conversions -------------------------------------------------------------------------------

# (value, expected fp16 bits): ties to even, overflow, subnormals, signed zero
F16_CASES = [
    (1.0, 0x3C00),
    (1.0 + 2.0**-11, 0x3C00),  # tie -> even
    (1.0 + 3 * 2.0**-11, 0x3C02),  # tie -> even (up)
    (1.0 + 2.0**-11 + 2.0**-20, 0x3C01),  # just above the tie
    (-2.5, 0xC100),
    (65504.0, 0x7BFF),
    (65519.99, 0x7BFF),
    (65520.0, 0x7C00),  # tie at the top rounds to inf
    (1e6, 0x7C00),
    (-math.inf, 0xFC00),
    (2.0**-14, 0x0400),  # smallest normal
    (2.0**-24, 0x0001),  # smallest subnormal
    (2.0**-25, 0x0000),  # tie -> even (zero)
    (3 * 2.0**-25, 0x0002),  # tie -> even (up)
    (-0.0, 0x8000),
    (2.0**-30, 0x0000),
]

# (value, expected bf16 bits)
BF16_CASES = [
    (1.0, 0x3F80),
    (1.0 + 2.0**-8, 0x3F80),  # tie -> even
    (1.0 + 3 * 2.0**-8, 0x3F82),  # tie -> even (up)
    (1.0 + 2.0**-8 + 2.0**-20, 0x3F81),
    (-2.5, 0xC020),
    (_f32(0x7F7F0000), 0x7F7F),  # largest bf16
    (_f32(0x7F7FFFFF), 0x7F80),  # largest fp32 rounds to inf
    (-math.inf, 0xFF80),
    (_f32(0x00080000), 0x0008),  # fp32 subnormal, exact
    (_f32(0x00008000), 0x0000),  # subnormal tie -> even (zero)
    (_f32(0x00018000), 0x0002),  # subnormal tie -> even (up)
    (-0.0, 0x8000),
]


@pytest.mark.parametrize("kind", [F16, BF16], ids=["f16", "bf16"])
def test_pack_rounds_to_nearest_even(kind: int, device: torch.device) -> None:
    cases = F16_CASES if kind == F16 else BF16_CASES
    values = np.array([v for v, _ in cases] + [math.nan, 3.0], dtype=np.float32)
    f16_words, bf16_words, _ = st.run_pack(_dev(values, device), block=len(values) // 2)
    got = _halves((f16_words if kind == F16 else bf16_words).cpu().numpy())
    want = np.array([b for _, b in cases], dtype=np.uint16)
    np.testing.assert_array_equal(got[: len(cases)], want)
    assert _is_nan_bits(got[-2:-1], kind).all(), "NaN must stay NaN"
    assert got[-1] == (0x4200 if kind == F16 else 0x4040)


def test_pack_puts_first_value_in_low_half(device: torch.device) -> None:
    f16_words, bf16_words, _ = st.run_pack(_dev(np.array([1.0, -2.0], np.float32), device), block=1)
    assert f16_words.item() & 0xFFFFFFFF == 0xC0003C00
    assert bf16_words.item() & 0xFFFFFFFF == 0xC0003F80


def test_pack_random_matches_torch(device: torch.device) -> None:
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(128) * np.exp2(rng.integers(-20, 20, 128))).astype(np.float32)
    f16_words, bf16_words, bits = (t.cpu().numpy() for t in st.run_pack(_dev(values, device)))
    for kind, words in ((F16, f16_words), (BF16, bf16_words)):
        dtype = torch.float16 if kind == F16 else torch.bfloat16
        want = torch.from_numpy(values).to(dtype).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(_halves(words), want)
    np.testing.assert_array_equal(bits, values.view(np.int32))


def test_unpack_edge_patterns(device: torch.device) -> None:
    halves = np.array(
        [0x0001, 0x03FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x8000, 0x3C00, 0xC100, 0x7F80, 0xFF81, 0x0080,
         0x7F7F],  # fmt: skip
        dtype=np.uint16,
    )
    words = (halves[0::2].astype(np.uint32) | (halves[1::2].astype(np.uint32) << 16)).view(np.int32)
    got = st.run_unpack(_dev(words, device), block=len(words)).cpu().numpy()
    want_f16 = halves.view(np.float16).astype(np.float32)
    want_bf16 = (halves.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got[:, :2].reshape(-1), want_f16)  # NaN == NaN here
    np.testing.assert_array_equal(got[:, 2:].reshape(-1), want_bf16)
    np.testing.assert_array_equal(np.signbit(got[:, :2].reshape(-1)), np.signbit(want_f16))
    assert got[0, 0] == np.float32(2.0**-24) and got[0, 2] == np.float32(_f32(0x00010000))


def test_unpack_random_and_round_trip(device: torch.device) -> None:
    rng = np.random.default_rng(2)
    words = rng.integers(0, 2**32, 256, dtype=np.uint64).astype(np.uint32).view(np.int32)
    got = st.run_unpack(_dev(words, device)).cpu().numpy()
    halves = _halves(words)
    np.testing.assert_array_equal(got[:, :2].reshape(-1), halves.view(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got[:, 2:].reshape(-1), (halves.astype(np.uint32) << 16).view(np.float32))
    # narrowing the widened values gives the words back (NaN halves excepted: payloads may change)
    for kind, cols in ((F16, slice(0, 2)), (BF16, slice(2, 4))):
        f16_words, bf16_words, _ = st.run_pack(_dev(got[:, cols].reshape(-1), device))
        back = _halves((f16_words if kind == F16 else bf16_words).cpu().numpy())
        keep = ~_is_nan_bits(halves, kind)
        assert keep.sum() > 200
        np.testing.assert_array_equal(back[keep], halves[keep])
        assert _is_nan_bits(back[~keep], kind).all()


def test_bits_round_trip(device: torch.device) -> None:
    special = np.array([0x7FC00001, 0x80000000, 0x7F800000, 0x00000001, 0xFF7FFFFF, 0x3F800000], np.uint32)
    rng = np.random.default_rng(3)
    bits = np.concatenate([special, rng.integers(0, 2**32, 58, dtype=np.uint64).astype(np.uint32)]).view(np.int32)
    _, _, back = st.run_pack(_dev(bits.view(np.float32), device))
    np.testing.assert_array_equal(back.cpu().numpy(), bits)


# ---- 16-byte loads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 8])
def test_load_16b(offset: int, device: torch.device) -> None:
    words = np.random.default_rng(4).integers(-(2**31), 2**31, 80, dtype=np.int64).astype(np.int32)
    got = st.run_load16(_dev(words, device), offset, 16, block=16).cpu().numpy()
    np.testing.assert_array_equal(got, words[offset : offset + 64])


@sim_only
def test_load_16b_misaligned_raises(device: torch.device) -> None:
    words = torch.arange(80, dtype=torch.int32)
    with pytest.raises(IndexError, match="not 16-byte aligned"):
        st.run_load16(words, 2, 16, block=16)


# ---- ex2 ---------------------------------------------------------------------------------------------


def test_ex2_matches_exp2(device: torch.device) -> None:
    x = np.random.default_rng(5).uniform(-125.0, 127.0, 64).astype(np.float32)
    x[:3] = [0.0, 1.0, -1.5]
    got = st.run_ex2(_dev(x, device)).cpu().numpy()
    np.testing.assert_allclose(got, np.exp2(x.astype(np.float64)), rtol=2.0**-21, atol=0)


def test_ex2_special_values_and_ftz(device: torch.device) -> None:
    x = np.array([-127.5, -140.0, -149.0, -math.inf, math.inf, 128.5, math.nan, -125.5], np.float32)
    got = st.run_ex2(_dev(x, device), block=len(x)).cpu().numpy()
    np.testing.assert_array_equal(got[:4], 0.0)  # subnormal results flush to zero
    assert np.isposinf(got[4]) and np.isposinf(got[5]) and np.isnan(got[6])
    assert got[7] == pytest.approx(2.0**-125.5, rel=2.0**-20)


def test_max_nan_is_max_and_propagates_nan(device: torch.device) -> None:
    rng = np.random.default_rng(11)
    a = rng.standard_normal(64).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    a[:8] = [math.nan, 1.0, math.nan, -math.inf, math.inf, -0.0, 0.0, -1e-40]
    b[:8] = [2.0, math.nan, math.nan, -math.inf, 3.0, 0.0, -0.0, -2e-40]
    got = st.run_max_nan(_dev(a, device), _dev(b, device)).cpu().numpy()
    assert np.isnan(got[:3]).all()  # a NaN on either side (a plain max would return the other)
    assert got[:3].view(np.uint32).tolist() == [0x7FFFFFFF] * 3  # the canonical NaN
    np.testing.assert_array_equal(got[3:], np.maximum(a[3:], b[3:]))
    assert not np.signbit(got[5]) and not np.signbit(got[6])  # -0 < +0 either way round
    assert got[7] == np.float32(-1e-40)  # subnormals kept (no .ftz)


# ---- warp shuffles and reductions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "threads,block,xor_mask",
    [(64, 64, 1), (64, 64, 16), (64, 32, 31), (16, 16, 5)],
    ids=["2warps^1", "2warps^16", "2blocks^31", "16lanes^5"],
)
def test_shuffles(threads: int, block: int, xor_mask: int, device: torch.device) -> None:
    rng = np.random.default_rng(threads + xor_mask)
    lanes_per_warp = min(block, 32)
    x = rng.standard_normal(threads).astype(np.float32)
    src = rng.integers(0, lanes_per_warp, threads).astype(np.int32)
    got_xor, got_idx = st.run_shuffle(_dev(x, device), _dev(src, device), xor_mask, block=block)
    tid = np.arange(threads)
    base = tid - tid % lanes_per_warp
    np.testing.assert_array_equal(got_xor.cpu().numpy(), x[base + ((tid % lanes_per_warp) ^ xor_mask)])
    np.testing.assert_array_equal(got_idx.cpu().numpy(), x[base + src])


@pytest.mark.parametrize("threads,block", [(64, 64), (64, 32), (16, 16)], ids=["2warps", "2blocks", "16lanes"])
def test_warp_sum_and_max(threads: int, block: int, device: torch.device) -> None:
    x = (np.random.default_rng(block).standard_normal(threads) * 10).astype(np.float32)
    max_width = min(block, 32)
    sums, maxes = (t.cpu().numpy() for t in st.run_reduce(_dev(x, device), max_width=max_width, block=block))
    for k, width in enumerate(st.REDUCE_WIDTHS):
        if width > max_width:
            assert np.isnan(sums[k]).all() and np.isnan(maxes[k]).all()
            continue
        groups = x.reshape(-1, width)
        want_sum = np.repeat(groups.astype(np.float64).sum(1), width)
        scale = np.repeat(np.abs(groups).astype(np.float64).sum(1), width)
        assert np.all(np.abs(sums[k] - want_sum) <= 1e-6 * scale), f"width {width}"
        np.testing.assert_array_equal(maxes[k], np.repeat(groups.max(1), width))
        # the butterfly leaves every lane of a group with the bitwise-same result
        assert (sums[k].reshape(-1, width) == sums[k].reshape(-1, width)[:, :1]).all()


# ---- load_row8 / store_row8 ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [F16, BF16, F32], ids=["f16", "bf16", "f32"])
def test_row8_widen_and_narrow(kind: int, device: torch.device) -> None:
    rng = np.random.default_rng(6 + kind)
    values = rng.standard_normal((8, 8)).astype(np.float32)
    values[0, :4] = [-0.0, math.inf, -math.inf, 1e-39]  # signed zero, infinities, fp32 subnormal
    if kind == F32:
        words = values.view(np.int32).reshape(-1)
    else:
        bits = st.half_bits(values, kind)
        values = st.half_values(bits, kind)
        words = st.pair_words(bits).reshape(-1)
    widened, stored = st.run_row8(kind, _dev(words, device), block=8)
    np.testing.assert_array_equal(widened.cpu().numpy(), values)
    np.testing.assert_array_equal(np.signbit(widened.cpu().numpy()), np.signbit(values))
    np.testing.assert_array_equal(stored.cpu().numpy(), words)


# ---- mma m16n8k16 -----------------------------------------------------------------------------------------


def test_fragment_layout_matches_ptx_isa() -> None:
    """Spot entries of lane 5 (groupID 1, threadID_in_group 1) written out from the ISA tables."""
    a = np.arange(256, dtype=np.uint16).reshape(16, 16)
    b = np.arange(128, dtype=np.uint16).reshape(16, 8) + 1000
    aw, bw = st.mma_fragments(a, b)
    a5, b5 = aw[5].view(np.uint32), bw[5].view(np.uint32)
    pairs = [(a[1, 2], a[1, 3]), (a[9, 2], a[9, 3]), (a[1, 10], a[1, 11]), (a[9, 10], a[9, 11])]
    assert [(int(w) & 0xFFFF, int(w) >> 16) for w in a5] == [(int(x), int(y)) for x, y in pairs]
    want_b = [(b[2, 1], b[3, 1]), (b[10, 1], b[11, 1])]
    assert [(int(w) & 0xFFFF, int(w) >> 16) for w in b5] == [(int(x), int(y)) for x, y in want_b]
    rows, cols = st.mma_accumulator_index()
    assert list(zip(rows[5], cols[5])) == [(1, 2), (1, 3), (9, 2), (9, 3)]
    assert sorted(zip(rows.reshape(-1), cols.reshape(-1))) == [(r, c) for r in range(16) for c in range(8)]


def _mma_case(kind: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a_bits = st.half_bits(rng.standard_normal((16, 16)), kind)
    b_bits = st.half_bits(rng.standard_normal((16, 8)), kind)
    return a_bits, b_bits, rng.standard_normal((16, 8)).astype(np.float32)


@pytest.mark.parametrize("kind", [F16, BF16], ids=["f16", "bf16"])
def test_mma_matches_numpy(kind: int, device: torch.device) -> None:
    a_bits, b_bits, c = _mma_case(kind, 7 + kind)
    rows, cols = st.mma_accumulator_index()
    a_words, b_words = st.mma_fragments(a_bits, b_bits)
    d = st.run_mma(kind, _dev(a_words, device), _dev(b_words, device), _dev(c[rows, cols], device)).cpu().numpy()
    a, b = st.half_values(a_bits, kind).astype(np.float64), st.half_values(b_bits, kind).astype(np.float64)
    want = a @ b + c
    np.testing.assert_allclose(d, want[rows, cols], rtol=0, atol=1e-5 * (np.abs(a) @ np.abs(b) + np.abs(c)).max())
    # the comparison tells layouts apart: B's transposed halves (k rows swapped) give another answer
    b_swapped = np.concatenate([b[8:], b[:8]])
    assert np.abs((a @ b_swapped + c) - want).max() > 0.1


@sim_only
def test_mma_needs_a_full_warp(device: torch.device) -> None:
    a_bits, b_bits, c = _mma_case(F16, 9)
    a_words, b_words = st.mma_fragments(a_bits, b_bits)
    with pytest.raises(RuntimeError, match="full warp"):
        st.run_mma(F16, _dev(a_words, device), _dev(b_words, device), _dev(c.reshape(32, 4), device), lanes=16)


def test_selfcheck_passes(device: torch.device) -> None:
    results = st.run_selfcheck(device)
    assert len(results) >= 14
    assert [r for r in results if not r[1]] == []
