"""Input validation every planner shares: page-table and indptr arrays as int32 host arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tilegraph.errors import InputError


def as_index_array(value: Any, name: str) -> np.ndarray:
    """An int32 1-D CPU torch tensor or numpy array as a numpy array (no copy); InputError naming
    ``name`` otherwise (the planner never reads device memory)."""
    if isinstance(value, torch.Tensor):
        if value.dtype is not torch.int32:
            raise InputError(f"{name} must be int32, got {value.dtype}")
        if not value.is_cpu:
            raise InputError(f"{name} must be on the CPU (the planner never reads device memory), got {value.device}")
        array = value.numpy()
    elif isinstance(value, np.ndarray):
        array = value
        if array.dtype != np.int32:
            raise InputError(f"{name} must be int32, got {array.dtype}")
    else:
        raise InputError(f"{name} must be an int32 CPU torch.Tensor or numpy array, got {type(value).__name__}")
    if array.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    return array
