"""The transformers backend's reading of 4-D masks (no kernels): where queries sit (the end of the
KV, or cache_position in a static cache), which queries and keys are real, and the check that
tilegraph's causal (+ window) mask over the compacted rows is exactly transformers' own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function  # noqa: E402

from tilegraph.errors import InputError  # noqa: E402
from tilegraph.integrations._hf_batch import batch_layout, read_mask  # noqa: E402

CPU = torch.device("cpu")


def mask(padding: list[list[int]], q_len: int, kv_len: int, q_offset: int, window: int | None = None) -> torch.Tensor:
    function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    return sdpa_mask(batch_size=len(padding), q_length=q_len, kv_length=kv_len, q_offset=q_offset, mask_function=function,
                     attention_mask=torch.tensor(padding, dtype=torch.bool), allow_is_causal_skip=False)  # fmt: skip


def test_dynamic_cache_queries_sit_at_the_end():
    view = read_mask(mask([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], 3, 5, 2), 2, 3, 5)
    assert view.offset == 2 and view.real_q.tolist() == [[True, True, True], [True, True, True]]
    layout = batch_layout(view, -1, CPU)
    assert layout.qo_indptr.tolist() == [0, 3, 6] and layout.kv_indptr.tolist() == [0, 3, 8]
    assert layout.past_counts.tolist() == [0, 2]


def test_static_cache_queries_sit_at_cache_position():
    """max_cache_len 8, 2 tokens already cached, 3 new: the last 3 positions are empty, never seen."""
    padding = [[1, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0]]
    view = read_mask(mask(padding, 3, 8, 2), 2, 3, 8)
    assert view.offset == 2
    layout = batch_layout(view, -1, CPU)
    assert layout.kv_indptr.tolist() == [0, 5, 9] and layout.kv_cols.tolist() == [0, 1, 2, 3, 4, 1, 2, 3, 4]


def test_right_padded_queries_are_not_real():
    view = read_mask(mask([[1, 1, 1, 0, 0]], 5, 5, 0), 1, 5, 5)
    assert view.offset == 0 and view.real_q.tolist() == [[True, True, True, False, False]]
    assert batch_layout(view, -1, CPU).kv_indptr.tolist() == [0, 3]


def test_window_must_match_the_layers_sliding_window():
    window_mask = mask([[1] * 6, [0, 0, 1, 1, 1, 1]], 6, 6, 0, window=3)
    view = read_mask(window_mask, 2, 6, 6)
    batch_layout(view, 2, CPU)  # sliding_window=3 -> window_left 2: exact
    for wrong in (1, 3, -1):
        with pytest.raises(InputError, match="not a causal mask with padding"):
            batch_layout(view, wrong, CPU)


def test_window_over_stored_tokens_with_a_gap_is_refused():
    """A decode step at position 5 of a row whose positions 3, 4 are padding: transformers' window of 3
    sees only itself; the 3 stored tokens sit right before it in the compacted row, so it would see them."""
    decode = mask([[1, 1, 1, 0, 0, 1]], 1, 6, 5, window=3)
    view = read_mask(decode, 1, 1, 6)
    stored = np.array([[True, True, True, False, False, False]])
    with pytest.raises(InputError, match="sliding window of 3"):
        batch_layout(view, 2, CPU, stored=stored)
    layout = batch_layout(view, 2, CPU)  # dense: only what the mask lets the query see
    assert layout.kv_cols.tolist() == [5]


def test_bidirectional_mask_is_refused():
    full = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(InputError, match="not a causal mask"):
        read_mask(full, 1, 4, 4)
