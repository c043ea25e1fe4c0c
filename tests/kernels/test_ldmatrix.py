"""ldmatrix x4 and its .trans form against the PTX ISA layout, and proof that they produce exactly
the mma.m16n8k16 A (plain, row-major A) and B (.trans, row-major K x N B) fragments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.kernels import selftest as st
from tilegraph.kernels.primitives import BF16, F16

sim_only = pytest.mark.skipif(not tilegraph.SIMULATOR, reason="simulator-only checks (undefined on a GPU)")


def _dev(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _random_words(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-(2**31), 2**31, (32, 4), dtype=np.int64).astype(np.int32)


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_matches_the_isa_layout(trans: bool, device: torch.device) -> None:
    src = _random_words(11 + trans)
    rows = np.random.default_rng(5 + trans).permutation(32).astype(np.int32)  # any row addresses
    got = st.run_ldmatrix(_dev(src, device), _dev(rows, device), trans).cpu().numpy()
    want = st.ldmatrix_expected(src, rows, trans)
    np.testing.assert_array_equal(got, want)
    other = st.ldmatrix_expected(src, rows, not trans)
    assert not np.array_equal(got, other)  # the two forms differ on these data: the test can fail


@pytest.mark.parametrize("kind", [F16, BF16])
def test_plain_gives_mma_a_and_trans_gives_mma_b(kind: int, device: torch.device) -> None:
    rng = np.random.default_rng(3 + kind)
    a_bits = st.half_bits(rng.standard_normal((16, 16)), kind)
    b_bits = st.half_bits(rng.standard_normal((16, 8)), kind)
    b2_bits = st.half_bits(rng.standard_normal((16, 8)), kind)
    a_words, b_words = st.mma_fragments(a_bits, b_bits)
    _, b2_words = st.mma_fragments(a_bits, b2_bits)
    # A row-major: A row r, 8-column chunk c is shared row 2r + c; matrices (rows 0-7 | 8-15) x (chunk 0 | 1)
    lane = np.arange(32)
    m, j = lane // 8, lane % 8
    a_rows = (2 * (j + 8 * (m & 1)) + (m >> 1)).astype(np.int32)
    got_a = st.run_ldmatrix(_dev(st.pair_words(a_bits).reshape(32, 4), device), _dev(a_rows, device), False)
    np.testing.assert_array_equal(got_a.cpu().numpy(), a_words)
    # B row-major [k, n] (one 16-byte row per k), a second B behind it: matrices 2 and 3
    b_src = st.pair_words(np.concatenate([b_bits, b2_bits])).reshape(32, 4)
    got_b = st.run_ldmatrix(_dev(b_src, device), _dev(lane.astype(np.int32), device), True).cpu().numpy()
    np.testing.assert_array_equal(got_b[:, :2], b_words)
    np.testing.assert_array_equal(got_b[:, 2:], b2_words)


@sim_only
def test_ldmatrix_refuses_a_partial_warp(device: torch.device) -> None:
    src = _random_words(1)
    with pytest.raises(Exception, match="full warp"):
        st.run_ldmatrix(_dev(src, device), _dev(np.zeros(32, np.int32), device), False, lanes=16)


@sim_only
def test_ldmatrix_refuses_a_misaligned_row() -> None:
    from tilegraph.kernels import primitives as prim

    with pytest.raises(IndexError, match="16-byte aligned"):
        prim.ldmatrix_x4(np.zeros(8, np.int32), 2)
