"""Non-tensor values <-> self-describing frames.

A frame is a 20-byte header followed by the payload::

    magic b"TQMC" | version u8 | codec u8 | flags u16 | payload length u64 | crc32 u32

all little-endian. The CRC-32 covers the header fields before it and the payload, so a truncated,
zero-length, overwritten or corrupted read never decodes as a value: ``None``, ``b""`` and ``""`` are
three different non-empty frames.

Payload codecs: ``NONE``, ``BYTES``, ``STR``, ``NDARRAY``, ``TENSOR`` (a top-level array/tensor),
``MSGPACK`` (bool, int, float, str, bytes, lists, tuples, dicts, and nested numpy arrays, numpy
scalars and tensors), and ``PICKLE``, used only when the caller allows pickle, for everything else.
Values read back are never unpickled unless ``allow_pickle`` is true.
"""

from __future__ import annotations

import enum
import pickle
import struct
import zlib
from typing import Any

import msgpack
import numpy as np
import torch

from .codes import ErrorCode

MAGIC = b"TQMC"
VERSION = 1
HEADER = struct.Struct("<4sBBHQI")
HEADER_SIZE = HEADER.size  # 20


class Codec(enum.IntEnum):
    NONE = 0
    BYTES = 1
    STR = 2
    MSGPACK = 3
    NDARRAY = 4
    TENSOR = 5
    PICKLE = 6


class _Ext(enum.IntEnum):
    NDARRAY = 1
    TENSOR = 2
    TUPLE = 3
    NPSCALAR = 4


class CodecError(ValueError):
    """A frame could not be decoded; ``code`` says why (a client-side ``ErrorCode``)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class UnencodableValueError(TypeError):
    """A value has a type the codec cannot store without pickle."""


def _crc(header_prefix: bytes, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(header_prefix)) & 0xFFFFFFFF


def _frame(codec: Codec, payload: bytes | memoryview) -> bytes:
    prefix = HEADER.pack(MAGIC, VERSION, codec, 0, len(payload), 0)[:-4]
    return prefix + struct.pack("<I", _crc(prefix, payload)) + bytes(payload)


# ----------------------------------------------------------------------------------- arrays, tensors
_TORCH_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``torch.float32``, ``"float32"`` or ``"torch.float32"`` -> ``torch.float32``; ValueError otherwise."""
    if isinstance(name, torch.dtype):
        return name
    if isinstance(name, str):
        dt = _TORCH_DTYPES.get(name.removeprefix("torch."))
        if dt is not None:
            return dt
    raise ValueError(f"unsupported dtype {name!r}; expected a torch.dtype or one of {sorted(_TORCH_DTYPES)}")


_DTYPE_NAMES: dict[torch.dtype, str] = {dt: str(dt).removeprefix("torch.") for dt in _TORCH_DTYPES.values()}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return _DTYPE_NAMES.get(dtype) or str(dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU copy of ``t`` in C order (zero-copy when already contiguous on CPU)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B") if flat.numel() else memoryview(b"")


def tensor_from_bytes(data: bytes | memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return buf.view(dtype).reshape(shape)


def _pack_tensor(t: torch.Tensor) -> bytes:
    return msgpack.packb([dtype_name(t.dtype), list(t.shape), bytes(tensor_bytes(t))])


def _unpack_tensor(data: bytes) -> torch.Tensor:
    name, shape, raw = msgpack.unpackb(data)
    return tensor_from_bytes(raw, torch_dtype(name), shape)


def _plain_dtype(dtype: np.dtype) -> bool:
    """Whether ``dtype.str`` describes the dtype fully (not object, structured or void)."""
    return not dtype.hasobject and dtype.kind != "V"


def _pack_ndarray(a: np.ndarray) -> bytes:
    if not _plain_dtype(a.dtype):
        raise UnencodableValueError(f"numpy arrays of dtype {a.dtype} cannot be stored without pickle")
    return msgpack.packb([a.dtype.str, list(a.shape), np.ascontiguousarray(a).tobytes()])


def _unpack_ndarray(data: bytes) -> np.ndarray:
    dtype, shape, raw = msgpack.unpackb(data)
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()


# ------------------------------------------------------------------------------------------ msgpack
def _default(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, tuple):
        return msgpack.ExtType(_Ext.TUPLE, _packb(list(obj)))
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(_Ext.NDARRAY, _pack_ndarray(obj))
    if isinstance(obj, np.generic):
        if not _plain_dtype(obj.dtype):
            raise UnencodableValueError(f"numpy scalars of dtype {obj.dtype} cannot be stored without pickle")
        return msgpack.ExtType(_Ext.NPSCALAR, msgpack.packb([obj.dtype.str, obj.tobytes()]))
    if isinstance(obj, torch.Tensor):
        return msgpack.ExtType(_Ext.TENSOR, _pack_tensor(obj))
    # strict_types sends subclasses here: store them as their plain base type.
    for base in (bool, int, float, str, bytes, list, dict):
        if isinstance(obj, base):
            return base(obj)
    raise UnencodableValueError(f"values of type {type(obj).__name__} cannot be stored without pickle")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _Ext.TUPLE:
        return tuple(_unpackb(data))
    if code == _Ext.NDARRAY:
        return _unpack_ndarray(data)
    if code == _Ext.NPSCALAR:
        dtype, raw = msgpack.unpackb(data)
        return np.frombuffer(raw, dtype=np.dtype(dtype))[0]
    if code == _Ext.TENSOR:
        return _unpack_tensor(data)
    raise CodecError(ErrorCode.CORRUPT_VALUE, f"unknown msgpack extension type {code}")


def _packb(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)
    except (OverflowError, ValueError) as exc:  # ints beyond 64 bits, recursion limits
        raise UnencodableValueError(f"value cannot be stored without pickle: {exc}") from exc


def _unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False, use_list=True)


# --------------------------------------------------------------------------------------- public API
def encode(value: Any, allow_pickle: bool = False) -> bytes:
    """The frame for ``value``.

    Raises:
        UnencodableValueError: the value's type needs pickle and ``allow_pickle`` is false.
    """
    if value is None:
        return _frame(Codec.NONE, b"")
    if type(value) in (bytes, bytearray, memoryview):
        return _frame(Codec.BYTES, bytes(value))
    if type(value) is str:
        return _frame(Codec.STR, value.encode("utf-8", "surrogatepass"))
    if type(value) is np.ndarray and _plain_dtype(value.dtype):
        return _frame(Codec.NDARRAY, _pack_ndarray(value))
    if isinstance(value, torch.Tensor):
        return _frame(Codec.TENSOR, _pack_tensor(value))
    try:
        return _frame(Codec.MSGPACK, _packb(value))
    except UnencodableValueError:
        if not allow_pickle:
            raise
    return _frame(Codec.PICKLE, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def frame_crc(frame: bytes | memoryview) -> int:
    """The CRC-32 recorded in a frame's header."""
    return HEADER.unpack_from(frame)[5]


def decode(frame: bytes | memoryview, allow_pickle: bool = False, expected_crc: int | None = None) -> Any:
    """The value in ``frame``, after checking magic, version, length and CRC.

    ``expected_crc`` (from the metadata ``put`` returned) must match the header's when given: a frame
    that is intact but is not the value that was put is refused too.

    Raises:
        CodecError: with ``code`` CORRUPT_VALUE, CHECKSUM_MISMATCH or PICKLE_NOT_ALLOWED.
    """
    view = memoryview(frame).cast("B")
    if len(view) < HEADER_SIZE:
        raise CodecError(ErrorCode.CORRUPT_VALUE, f"frame of {len(view)} bytes is shorter than the header")
    magic, version, codec, _flags, length, crc = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(ErrorCode.CORRUPT_VALUE, "not a tq-mooncake frame (bad magic)")
    if version != VERSION:
        raise CodecError(ErrorCode.CORRUPT_VALUE, f"unsupported frame version {version}")
    if length != len(view) - HEADER_SIZE:
        raise CodecError(
            ErrorCode.CORRUPT_VALUE, f"frame says {length} payload bytes, {len(view) - HEADER_SIZE} were read"
        )
    payload = view[HEADER_SIZE:]
    if _crc(bytes(view[: HEADER_SIZE - 4]), payload) != crc:
        raise CodecError(ErrorCode.CHECKSUM_MISMATCH, "frame checksum does not match its contents")
    if expected_crc is not None and crc != expected_crc:
        raise CodecError(ErrorCode.CHECKSUM_MISMATCH, "stored value is not the one its metadata describes")
    try:
        kind = Codec(codec)
    except ValueError:
        raise CodecError(ErrorCode.CORRUPT_VALUE, f"unknown codec {codec}") from None
    try:
        return _decode_payload(kind, payload, allow_pickle)
    except CodecError:
        raise
    except Exception as exc:  # a frame with a valid CRC but an undecodable payload
        raise CodecError(ErrorCode.CORRUPT_VALUE, f"{kind.name} payload does not decode: {exc}") from exc


def _decode_payload(kind: Codec, payload: memoryview, allow_pickle: bool) -> Any:
    if kind is Codec.NONE:
        return None
    if kind is Codec.BYTES:
        return bytes(payload)
    if kind is Codec.STR:
        return str(payload, "utf-8", "surrogatepass")
    if kind is Codec.NDARRAY:
        return _unpack_ndarray(bytes(payload))
    if kind is Codec.TENSOR:
        return _unpack_tensor(bytes(payload))
    if kind is Codec.MSGPACK:
        return _unpackb(bytes(payload))
    if not allow_pickle:
        raise CodecError(ErrorCode.PICKLE_NOT_ALLOWED, "refusing to unpickle a stored value (allow_pickle is off)")
    return pickle.loads(payload)
