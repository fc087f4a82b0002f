"""``same_value``: whether a value read back is the value that was written, exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tq_mooncake.client.codec import tensor_bytes


def same_value(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same value: tensors and arrays of the same dtype, shape and bytes (so NaNs in
    them compare equal and -0.0 differs from 0.0; object arrays element by element), lists, tuples and dicts
    element by element, anything else of the same type and equal (so a float NaN is not the same as itself).
    Dense tensors only (the client stores no others)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bytes(tensor_bytes(a)) == bytes(tensor_bytes(b))
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if a.dtype.hasobject:  # the bytes would be pointers: compare the objects
            return same_value(a.tolist(), b.tolist())
        return a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
