"""Per-key plans: how a value is written, how a key is read back, and what ``put`` returns as metadata.

Pure functions of their arguments (no store): validation happens here, before anything is written.

* A tensor with at least one byte is written raw, zero-copy, from its own (contiguous, CPU) memory; its
  metadata is ``{"nbytes", "dtype", "shape"}``.
* Every other value, including a tensor with zero elements (the store cannot hold zero bytes), is
  written as a codec frame; its metadata is ``{"nbytes", "crc32"}``.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from . import codec
from .codes import ErrorCode


def validate_keys(keys: Any, what: str = "keys") -> list[str]:
    """``keys`` as a list of distinct, non-empty, UTF-8-encodable strings; ValueError/TypeError otherwise."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise TypeError(f"{what} must be a list of str, got {type(keys).__name__}")
    keys = list(keys)
    # The common case at C speed (a third of the per-key loop's time): plain distinct non-empty UTF-8 strings.
    if all(type(k) is str for k in keys) and len(unique := set(keys)) == len(keys) and "" not in unique:
        try:
            "".join(keys).encode("utf-8")
            return keys
        except UnicodeEncodeError:
            pass  # the loop below names the key
    seen: set[str] = set()
    duplicates: list[str] = []
    for i, key in enumerate(keys):
        if not isinstance(key, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(key).__name__}")
        if not key:
            raise ValueError(f"{what}[{i}] is an empty string; keys must be non-empty")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what}[{i}] {key!r} is not valid UTF-8 (lone surrogate)") from None
        if key in seen:
            duplicates.append(key)
        seen.add(key)
    if duplicates:
        shown = ", ".join(repr(k) for k in duplicates[:5])
        raise ValueError(f"duplicate keys in one call: {shown}{' ...' if len(duplicates) > 5 else ''}")
    return keys


def check_parallel(keys: list[str], name: str, values: Any, required: bool = False) -> list[Any] | None:
    """``values`` as a list as long as ``keys``; None stays None unless ``required`` (then TypeError)."""
    if values is None:
        if required:
            raise TypeError(f"{name} must be a list (one entry per key), got None")
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list (one entry per key), got {type(values).__name__}")
    if len(values) != len(keys):
        raise ValueError(f"{name} has {len(values)} entries for {len(keys)} keys; they must match")
    return list(values)


# ------------------------------------------------------------------------------------------------ put
class PutItem(NamedTuple):
    """One value ready to write: ``size`` bytes at ``ptr``, kept alive by ``holder``."""

    ptr: int
    size: int
    meta: dict[str, Any]
    holder: Any


def _raw_tensor(key: str, t: torch.Tensor, max_value_bytes: int) -> PutItem:
    """``t`` written as its raw bytes from its own memory when it is a contiguous CPU tensor (no copy), else from
    a contiguous CPU copy (lazy conjugate and negative views resolved). The size is checked before copying."""
    size = t.numel() * t.element_size()
    _check_size(key, size, max_value_bytes)
    try:
        t = codec.dense_cpu(t)
    except codec.UnencodableValueError as exc:
        raise TypeError(f"value for key {key!r}: {exc}") from None
    meta = {"nbytes": size, "dtype": codec.dtype_name(t.dtype), "shape": list(t.shape)}
    return PutItem(t.data_ptr(), size, meta, t)


def prepare_put(key: str, value: Any, allow_pickle: bool, max_value_bytes: int) -> PutItem:
    """How ``value`` is written under ``key``: a storable tensor with at least one element as its raw bytes
    (``codec.is_raw_tensor``), anything else as a codec frame.

    Raises:
        TypeError: the value cannot be stored (``codec.encode``: e.g. nested past ``codec.MAX_DEPTH``, a sparse
            or quantized tensor, a numpy subclass) without pickle, or with it when pickle fails too.
        ValueError: the stored value would be larger than ``max_value_bytes``.
    """
    if codec.is_raw_tensor(value):
        return _raw_tensor(key, value, max_value_bytes)
    try:
        frame = codec.encode(value, allow_pickle=allow_pickle)
    except codec.UnencodableValueError as exc:
        hint = "" if allow_pickle else " (set allow_pickle: true to allow it)"
        raise TypeError(f"value for key {key!r}: {exc}{hint}") from None
    _check_size(key, len(frame), max_value_bytes)
    holder = np.frombuffer(frame, dtype=np.uint8)
    return PutItem(holder.ctypes.data, len(frame), {"nbytes": len(frame), "crc32": codec.frame_crc(frame)}, holder)


def _check_size(key: str, size: int, max_value_bytes: int, what: str | None = None) -> None:
    """ValueError naming ``key`` when ``size`` bytes (``what`` says of what; default the value) are more than
    ``max_value_bytes``."""
    if size > max_value_bytes:
        what = what or f"value for key {key!r} is"
        raise ValueError(f"{what} {size} bytes, more than max_value_bytes={max_value_bytes}")


# ------------------------------------------------------------------------------------------------ get
class ReadKind(enum.Enum):
    TENSOR = "tensor"  # raw bytes into a fresh tensor of known dtype and shape
    FRAME = "frame"  # a codec frame, size known from metadata or asked from the store


class ReadPlan(NamedTuple):
    """How to read one key. ``size`` None: ask the store. ``dtype``/``shape``: what the caller expects."""

    kind: ReadKind
    size: int | None
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None
    crc: int | None = None


_MAX_DIM = 2**63 - 1  # torch's sizes are int64


def _shape(key: str, shape: Any) -> tuple[int, ...]:
    """``shape`` as a tuple of dimensions; TypeError/ValueError naming ``key`` unless it is a sequence of ints
    in ``0..2**63-1``."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise TypeError(f"shape for key {key!r} must be a sequence of ints, got {shape!r}")
    dims = tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in dims):
        raise ValueError(f"shape for key {key!r} must hold non-negative ints (below 2**63), got {shape!r}")
    return dims


def plan_get(key: str, shape: Any, dtype: Any, meta: Any, *, max_value_bytes: int) -> ReadPlan:
    """The read plan for ``key`` from what the caller passed; ValueError/TypeError naming the key where they
    disagree, or where the value they describe is larger than ``max_value_bytes`` (nothing is allocated).

    Metadata cut to its write id (``write_id_only``) plans like none and keeps the write id check.
    Without a dtype (none asked for, none in the metadata) the key is read as a frame whatever ``shape`` says
    (TQ passes shapes for non-tensor fields too): a value stored as a raw tensor then fails with CORRUPT_VALUE,
    since its bytes carry no header to read it by.
    """
    try:
        want_dtype = codec.torch_dtype(dtype) if dtype is not None else None
    except ValueError as exc:
        raise ValueError(f"dtype for key {key!r}: {exc}") from None
    is_tensor = want_dtype is not None or (isinstance(meta, Mapping) and "dtype" in meta)
    want_shape = _shape(key, shape) if shape is not None and is_tensor else None
    if meta is not None and not write_id_only(meta):
        return _plan_from_meta(key, meta, want_dtype, want_shape, max_value_bytes)
    if want_dtype is None:
        return ReadPlan(ReadKind.FRAME, None)
    if want_shape is None:
        raise ValueError(f"key {key!r} has a dtype but no shape (pass shapes, or the metadata put returned)")
    size = math.prod(want_shape) * want_dtype.itemsize
    _check_size(key, size, max_value_bytes, f"shape {list(want_shape)} of {want_dtype} for key {key!r} is")
    if size == 0:  # zero-byte tensors are stored as frames
        return ReadPlan(ReadKind.FRAME, None, want_dtype, want_shape)
    return ReadPlan(ReadKind.TENSOR, size, want_dtype, want_shape)


def write_id_only(meta: Any) -> bool:
    """Whether ``meta`` is a put's metadata cut to its write id, ``{"wid": ...}``: the read is then planned from the
    caller's dtype and shape, as without metadata, and the write id is still checked."""
    return type(meta) is dict and len(meta) == 1 and "wid" in meta


@functools.lru_cache(maxsize=4096)
def _stored_tensor(dtype: Any, shape: tuple[Any, ...], size: int) -> ReadPlan | None:
    """The read plan of a raw tensor as ``put`` described it, or None when the description is inconsistent.
    Cached: the same few (dtype, shape) pairs recur on every call."""
    try:
        stored_dtype = codec.torch_dtype(dtype)
        stored_shape = _shape("", shape)
    except (TypeError, ValueError):
        return None
    if math.prod(stored_shape) * stored_dtype.itemsize != size:
        return None
    return ReadPlan(ReadKind.TENSOR, size, stored_dtype, stored_shape)


def _plan_from_meta(
    key: str, meta: Any, want_dtype: torch.dtype | None, want_shape: tuple[int, ...] | None, max_value_bytes: int
) -> ReadPlan:
    bad = f"custom_backend_meta for key {key!r} is not metadata returned by put: {meta!r}"
    if type(meta) is not dict and not isinstance(meta, Mapping):
        raise ValueError(bad)
    size = meta.get("nbytes")
    if type(size) is not int or size < 1:
        raise ValueError(bad)
    _check_size(key, size, max_value_bytes, f"custom_backend_meta for key {key!r} says")
    if "dtype" in meta:
        shape = meta.get("shape")
        try:
            plan = _stored_tensor(meta["dtype"], tuple(shape), size) if isinstance(shape, (list, tuple)) else None
        except TypeError:  # an unhashable dtype or dimension
            plan = None
        if plan is None:
            raise ValueError(bad)
        if want_dtype is not None and want_dtype != plan.dtype:
            raise ValueError(f"key {key!r} was stored as {plan.dtype}, but dtype {want_dtype} was asked for")
        # The caller's shape is the layout it wants (TQ asks [1] for a 0-d row it stored): honoured when it
        # holds the same number of elements, refused otherwise.
        if want_shape is not None and want_shape != plan.shape:
            assert plan.shape is not None
            if math.prod(want_shape) != math.prod(plan.shape):
                raise ValueError(
                    f"key {key!r} was stored with shape {list(plan.shape)}, but shape {list(want_shape)} was asked for"
                )
            return ReadPlan(ReadKind.TENSOR, size, plan.dtype, want_shape)
        return plan
    crc = meta.get("crc32")
    if type(crc) is not int:
        raise ValueError(bad)
    return ReadPlan(ReadKind.FRAME, size, want_dtype, want_shape, crc)


def allocate(plan: ReadPlan, size: int, memory: memoryview | None = None) -> tuple[int, Any]:
    """A destination for a stored object of ``size`` bytes (payload and trailer) read for ``plan``: (pointer,
    holder). The holder is one uint8 block: a torch tensor for a raw tensor (the value handed back is a view of
    its first bytes, so its storage is the block), a numpy array for a frame; over ``memory`` (``size`` writable
    bytes, e.g. a ``TransferMemory`` lease, which the holder then keeps alive) where given, else fresh."""
    if memory is not None:
        if plan.kind is ReadKind.TENSOR:
            block = torch.frombuffer(memory, dtype=torch.uint8)
            return block.data_ptr(), block
        buf = np.frombuffer(memory, dtype=np.uint8)
        return buf.ctypes.data, buf
    if plan.kind is ReadKind.TENSOR:
        block = torch.empty(size, dtype=torch.uint8)
        return block.data_ptr(), block
    buf = np.empty(size, dtype=np.uint8)
    return buf.ctypes.data, buf


def finish(plan: ReadPlan, holder: Any, payload_size: int, allow_pickle: bool) -> Any:
    """The value in the first ``payload_size`` bytes of ``holder`` (a block from ``allocate`` whose trailer was
    checked). Raises ``codec.CodecError`` when it is not a valid value."""
    if plan.kind is ReadKind.TENSOR:
        assert plan.dtype is not None and plan.shape is not None
        # The block's first bytes as a contiguous tensor of the plan's dtype and shape, on the block's storage (one
        # op: slicing and two views cost 3.8 us a key, this 2.3 us).
        return torch.empty(0, dtype=plan.dtype).set_(holder.untyped_storage(), 0, plan.shape)
    value = codec.decode(memoryview(holder)[:payload_size], allow_pickle=allow_pickle, expected_crc=plan.crc)
    if plan.dtype is not None:
        if not isinstance(value, torch.Tensor):
            raise codec.CodecError(
                ErrorCode.TYPE_MISMATCH, f"a tensor of {plan.dtype} was asked for, a {type(value).__name__} was stored"
            )
        if value.dtype != plan.dtype or (plan.shape is not None and value.numel() != math.prod(plan.shape)):
            raise codec.CodecError(
                ErrorCode.TYPE_MISMATCH,
                f"stored tensor is {value.dtype}{list(value.shape)}, {plan.dtype}{list(plan.shape or ())} asked for",
            )
        if plan.shape is not None:
            value = value.reshape(plan.shape)
    return value
