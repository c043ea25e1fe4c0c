"""cp.async (16-byte global -> shared, zero fill, commit/wait groups) against numpy, and proof that
the simulator's deferred completion catches a kernel that reads its tile before the wait."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.kernels import _sim_async
from tilegraph.kernels import selftest as st

sim_only = pytest.mark.skipif(not tilegraph.SIMULATOR, reason="deferred completion is the simulator's emulation")
BLOCK = 8


def _src(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    src = rng.integers(-(2**31), 2**31, 8 * BLOCK, dtype=np.int64).astype(np.int32)
    src[(src == -1) | (src == _sim_async.PENDING)] = 7  # the "not landed" markers
    return src


def test_cp_async_copies_and_zero_fills(device: torch.device) -> None:
    src = _src(1)
    got_a, got_b = (t.cpu().numpy() for t in st.run_cp_async(torch.from_numpy(src).to(device), "all", BLOCK))
    want_a, want_b = st.cp_async_expected(src, BLOCK)
    np.testing.assert_array_equal(got_a, want_a)
    np.testing.assert_array_equal(got_b, want_b)
    assert (want_a == 0).all(axis=1).any() and not (want_a == 0).all()  # both zero-filled and copied rows


@sim_only
def test_missing_wait_reads_stale_shared_memory(device: torch.device) -> None:
    src = _src(2)
    got_a, got_b = (t.cpu().numpy() for t in st.run_cp_async(torch.from_numpy(src).to(device), "none", BLOCK))
    pending = _sim_async.PENDING
    assert (got_a == pending).all() and (got_b == pending).all()  # nothing landed: the bug is visible every run


@sim_only
def test_wait_group_1_lands_only_the_older_group(device: torch.device) -> None:
    src = _src(3)
    got_a, got_b = (t.cpu().numpy() for t in st.run_cp_async(torch.from_numpy(src).to(device), "first", BLOCK))
    want_a, _ = st.cp_async_expected(src, BLOCK)
    np.testing.assert_array_equal(got_a, want_a)
    assert (got_b == _sim_async.PENDING).all()


@sim_only
def test_misaligned_shared_index_is_refused() -> None:
    with pytest.raises(RuntimeError, match="inside a simulated kernel"):
        _sim_async.commit()
    with pytest.raises(IndexError, match="16-byte aligned"):
        _sim_async.copy(np.zeros(8, np.int32), 2, np.zeros(8, np.int32), 0, True)


def test_unknown_wait_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="waits="):
        st.make_cp_async_kernel("some", BLOCK)
