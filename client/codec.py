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

What is stored comes back exactly, or is refused by ``encode`` with ``UnencodableValueError`` (a TypeError):

* tensors: dense (strided), plain ``torch.Tensor`` or ``nn.Parameter`` (stored as its data), on any device, of
  every dtype in ``TORCH_DTYPES`` (all but the quantized ones); lazy conjugate and negative views are resolved
  (a negative view of a dtype torch cannot negate is refused). Sparse, nested, meta and quantized tensors and
  other ``Tensor`` subclasses are refused.
* numpy: plain ``np.ndarray`` and numpy scalars of non-object, non-structured dtypes; subclasses (masked
  arrays, ``np.matrix``, ``np.memmap``, ...) are refused.
* containers (lists, tuples, dicts) nest at most ``MAX_DEPTH`` deep; ``decode`` refuses a frame that nests
  deeper (CORRUPT_VALUE) and never recurses without bound on any bytes.

With ``allow_pickle`` whatever is refused is pickled instead (when pickle can hold it; else still refused).
"""

from __future__ import annotations

import enum
import pickle
import struct
import warnings
import zlib
from collections.abc import Callable
from itertools import chain, compress
from typing import Any

import msgpack
import numpy as np
import torch

from .codes import ErrorCode

MAGIC = b"TQMC"
VERSION = 1
HEADER = struct.Struct("<4sBBHQI")
HEADER_SIZE = HEADER.size  # 20

MAX_DEPTH = 64
"""How deep containers (lists, tuples, dicts) may nest in a value, counting the value itself: ``[[1]]`` is 2 deep.
Deeper values are refused by ``encode`` (``NestingTooDeepError``; pickle may carry them when allowed), and
frames nesting deeper fail ``decode`` with CORRUPT_VALUE. Each tuple is a msgpack document nested in its
parent, so this also bounds the decoder's recursion (and its C stack: about 1 KiB per level)."""


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


class NestingTooDeepError(UnencodableValueError):
    """A value nests containers deeper than ``MAX_DEPTH``."""


def _crc(header_prefix: bytes, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(header_prefix)) & 0xFFFFFFFF


def _frame(codec: Codec, payload: bytes | memoryview) -> bytes:
    prefix = HEADER.pack(MAGIC, VERSION, codec, 0, len(payload), 0)[:-4]
    return prefix + struct.pack("<I", _crc(prefix, payload)) + bytes(payload)


# ----------------------------------------------------------------------------------------------- depth
_CONTAINERS = (list, tuple, dict)
_PLAIN_CONTAINERS = frozenset(_CONTAINERS)


def _members(container: Any) -> Any:
    return chain(container, container.values()) if isinstance(container, dict) else container


def _container_kinds(types: set[type]) -> set[type]:
    """The container types (lists, tuples, dicts or their subclasses) among ``types``."""
    kinds = types & _PLAIN_CONTAINERS
    others = types - kinds
    return kinds | {t for t in others if issubclass(t, _CONTAINERS)} if others else kinds


_SMALL = 64  # containers (and members of one) walked recursively before the level walk takes over


class _Large(Exception):
    pass


def nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` containers (lists, tuples, dicts and their subclasses; dict keys
    count). Small values are walked recursively (at most ``limit`` frames deep), larger ones level by level.
    Cycles count as too deep."""
    if not isinstance(value, _CONTAINERS):
        return False
    try:
        return _deeper_small(value, limit, [_SMALL])
    except _Large:
        return _deeper_by_level(value, limit)


def _deeper_small(container: Any, limit: int, budget: list[int]) -> bool:
    """``nests_deeper_than`` for a container, by recursion; raises ``_Large`` past ``budget`` containers or at a
    container of more than ``_SMALL`` members."""
    if limit <= 0:
        return True
    budget[0] -= 1
    if budget[0] < 0 or len(container) > _SMALL:
        raise _Large
    for member in _members(container):
        if isinstance(member, _CONTAINERS) and _deeper_small(member, limit - 1, budget):
            return True
    return False


def _deeper_by_level(value: Any, limit: int) -> bool:
    """``nests_deeper_than`` for a container, one level at a time with C-level loops, each distinct container once
    per level."""
    level, kinds = [value], {type(value)}
    for _ in range(limit):
        if dict in kinds or (kinds - _PLAIN_CONTAINERS and any(issubclass(k, dict) for k in kinds)):
            members = list(chain.from_iterable(map(_members, level)))
        else:
            members = level[0] if len(level) == 1 else list(chain.from_iterable(level))
        kinds = _container_kinds(set(map(type, members)))
        if not kinds:
            return False
        level = list(compress(members, map(kinds.__contains__, map(type, members))))
        if len(level) > 1 and len(set(map(id, level))) < len(level):  # shared containers: visit each once
            level = list(dict(zip(map(id, level), level, strict=True)).values())
    return True


# ----------------------------------------------------------------------------------- arrays, tensors
def _storable(dtype: torch.dtype) -> bool:
    """Whether a tensor of ``dtype`` is its bytes (not quantized) and can be rebuilt from them in this torch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 is "experimental", quantized tensors are deprecated
        try:
            if torch.empty(0, dtype=dtype).is_quantized:  # scale and zero point are not in the bytes
                return False
            raw = torch.arange(2 * dtype.itemsize, dtype=torch.uint8)
            return torch.equal(raw.view(dtype).view(torch.uint8), raw)
        except (RuntimeError, TypeError):
            return False


TORCH_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
    if _storable(dt)
}
"""Every dtype a tensor may have to be stored, by name: all of this torch's dtypes but the quantized ones."""

_DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in TORCH_DTYPES.items()}
# Integer dtypes of each item size: tensors are copied as these (some dtypes, e.g. int4, have no copy kernels).
_CARRIERS: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_OUT_OF_MEMORY: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``torch.float32``, ``"float32"`` or ``"torch.float32"`` -> ``torch.float32``; ValueError for anything else,
    including dtypes tensors cannot be stored in (quantized)."""
    if isinstance(name, torch.dtype) and name in _DTYPE_NAMES:
        return name
    if isinstance(name, str):
        dt = TORCH_DTYPES.get(name.removeprefix("torch."))
        if dt is not None:
            return dt
    raise ValueError(f"unsupported dtype {name!r}; expected a torch.dtype or one of {sorted(TORCH_DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return _DTYPE_NAMES.get(dtype) or str(dtype).removeprefix("torch.")


def tensor_problem(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be stored as its bytes, dtype and shape; None when it can."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"tensor subclass {type(t).__name__} cannot be stored without pickle"
    if t.is_nested:
        return "nested tensors (torch.nested) cannot be stored without pickle"
    if t.layout != torch.strided:
        return f"only strided (dense) tensors can be stored without pickle, got {t.layout}"
    if t.is_meta:
        return "meta tensors hold no data and cannot be stored without pickle"
    if t.dtype not in _DTYPE_NAMES:
        return f"tensors of dtype {t.dtype} cannot be stored without pickle"
    return None


def is_raw_tensor(value: Any) -> bool:
    """Whether ``value`` is stored as its raw bytes: a storable tensor of at least one element."""
    return isinstance(value, torch.Tensor) and tensor_problem(value) is None and value.numel() > 0


def dense_cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor of ``t``'s dtype, shape and values: ``t`` itself when it is one (no copy), else a
    copy; lazy conjugate and negative views are resolved. ``t`` must pass ``tensor_problem``.

    Raises:
        UnencodableValueError: the copy failed (e.g. the device reported an error).
    """
    if t.is_cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg():
        return t
    try:
        t = t.detach().resolve_conj().resolve_neg()
        carrier = _CARRIERS.get(t.dtype.itemsize)
        bits = t.view(carrier) if carrier is not None else t
        bits = bits.cpu().contiguous()
        return bits.view(t.dtype) if carrier is not None else bits
    except _OUT_OF_MEMORY:
        raise
    except RuntimeError as exc:  # e.g. a negative view of a dtype torch cannot negate (bool, float8, int4)
        raise UnencodableValueError(f"tensor of {t.dtype} on {t.device} could not be copied: {exc}") from exc


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t``'s values in C order (zero-copy when it is contiguous on the CPU)."""
    t = dense_cpu(t).detach()
    if not t.numel():
        return memoryview(b"")
    flat = t.as_strided((t.numel(),), (1,))  # not reshape: a contiguous tensor's size-1 dims may have any stride
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensor_from_bytes(data: bytes | memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return buf.view(dtype).reshape(shape)


def _dims(shape: Any) -> list[int]:
    """A decoded shape, checked: a list of non-negative ints."""
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"bad shape {shape!r}")
    return shape


def _pack_tensor(t: torch.Tensor) -> bytes:
    problem = tensor_problem(t)
    if problem is not None:
        raise UnencodableValueError(problem)
    return msgpack.packb([dtype_name(t.dtype), list(t.shape), bytes(tensor_bytes(t))])


def _unpack_tensor(data: bytes) -> torch.Tensor:
    name, shape, raw = msgpack.unpackb(data)
    return tensor_from_bytes(raw, torch_dtype(name), _dims(shape))


def _plain_dtype(dtype: np.dtype) -> bool:
    """Whether ``dtype.str`` describes the dtype fully (not object, structured or void)."""
    return not dtype.hasobject and dtype.kind != "V"


def _numpy_dtype(descr: Any) -> np.dtype:
    """A decoded numpy dtype, checked: plain (never one whose items would need unpickling)."""
    dtype = np.dtype(descr) if isinstance(descr, str) else None
    if dtype is None or not _plain_dtype(dtype):
        raise ValueError(f"bad numpy dtype {descr!r}")
    return dtype


def _pack_ndarray(a: np.ndarray) -> bytes:
    if type(a) is not np.ndarray:
        raise UnencodableValueError(f"numpy array subclass {type(a).__name__} cannot be stored without pickle")
    if not _plain_dtype(a.dtype):
        raise UnencodableValueError(f"numpy arrays of dtype {a.dtype} cannot be stored without pickle")
    return msgpack.packb([a.dtype.str, list(a.shape), np.ascontiguousarray(a).tobytes()])


def _unpack_ndarray(data: bytes) -> np.ndarray:
    dtype, shape, raw = msgpack.unpackb(data)
    return np.frombuffer(raw, dtype=_numpy_dtype(dtype)).reshape(_dims(shape)).copy()


def _pack_npscalar(s: np.generic) -> bytes:
    if type(s) is not s.dtype.type:
        raise UnencodableValueError(f"numpy scalar subclass {type(s).__name__} cannot be stored without pickle")
    if not _plain_dtype(s.dtype):
        raise UnencodableValueError(f"numpy scalars of dtype {s.dtype} cannot be stored without pickle")
    return msgpack.packb([s.dtype.str, s.tobytes()])


def _unpack_npscalar(data: bytes) -> np.generic:
    dtype, raw = msgpack.unpackb(data)
    return np.frombuffer(raw, dtype=_numpy_dtype(dtype))[0]


# ------------------------------------------------------------------------------------------ msgpack
def _default(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, tuple):
        return msgpack.ExtType(_Ext.TUPLE, _packb(list(obj)))
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(_Ext.NDARRAY, _pack_ndarray(obj))
    if isinstance(obj, np.generic):
        return msgpack.ExtType(_Ext.NPSCALAR, _pack_npscalar(obj))
    if isinstance(obj, torch.Tensor):
        return msgpack.ExtType(_Ext.TENSOR, _pack_tensor(obj))
    # strict_types sends subclasses here: store them as their plain base type.
    for base in (bool, int, float, str, bytes, list, dict):
        if isinstance(obj, base):
            return base(obj)
    raise UnencodableValueError(f"values of type {type(obj).__name__} cannot be stored without pickle")


def _ext_hook(depth: int) -> Callable[[int, bytes], Any]:
    """msgpack's ``ext_hook`` for a document nested in ``depth`` tuples (a function: faster to call than an object)."""

    def hook(code: int, data: bytes) -> Any:
        if code == _Ext.TUPLE:
            if depth >= MAX_DEPTH:
                raise CodecError(ErrorCode.CORRUPT_VALUE, f"value nests more than {MAX_DEPTH} tuples deep")
            if depth == 0:  # the common case, and one more unpackb on the C stack is fine
                return tuple(msgpack.unpackb(data, ext_hook=_HOOKS[1], raw=False, strict_map_key=False))
            return tuple(_unpack_nested(data, _HOOKS[depth + 1]))
        if code == _Ext.NDARRAY:
            return _unpack_ndarray(data)
        if code == _Ext.NPSCALAR:
            return _unpack_npscalar(data)
        if code == _Ext.TENSOR:
            return _unpack_tensor(data)
        raise CodecError(ErrorCode.CORRUPT_VALUE, f"unknown msgpack extension type {code}")

    return hook


_HOOKS = [_ext_hook(depth) for depth in range(MAX_DEPTH + 1)]
_UNPACK_OPTIONS: dict[str, Any] = {"raw": False, "strict_map_key": False, "use_list": True}


def _packb(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)
    except (UnencodableValueError, MemoryError):
        raise
    except Exception as exc:  # ints beyond 64 bits, msgpack's own limits, a subclass that fails to convert
        raise UnencodableValueError(f"cannot be stored without pickle: {exc}") from exc


def _unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_HOOKS[0], **_UNPACK_OPTIONS)


def _unpack_nested(data: bytes, hook: Callable[[int, bytes], Any]) -> Any:
    """The one document in ``data``, an extension's payload nested in another's. Decoded with an ``Unpacker``, whose
    state is on the heap: ``msgpack.unpackb`` keeps about 40 KiB of it on the C stack per call, which nesting would
    multiply (a 200-deep tuple overflowed an 8 MiB stack)."""
    unpacker = msgpack.Unpacker(ext_hook=hook, max_buffer_size=max(len(data), 1), **_UNPACK_OPTIONS)
    unpacker.feed(data)
    value = unpacker.unpack()
    if unpacker.tell() != len(data):
        raise CodecError(ErrorCode.CORRUPT_VALUE, "extra bytes after a nested value")
    return value


def _pickle(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except MemoryError:
        raise
    except Exception as exc:  # PicklingError, unpicklable members, RecursionError, a failing __reduce__
        raise UnencodableValueError(f"cannot be pickled: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------- public API
def encode(value: Any, allow_pickle: bool = False) -> bytes:
    """The frame for ``value``.

    Raises:
        UnencodableValueError: the value cannot be stored without pickle (see the module docstring; a
            ``NestingTooDeepError`` past ``MAX_DEPTH``) and ``allow_pickle`` is false, or pickle fails too.
    """
    try:
        return _encode(value)
    except UnencodableValueError:
        if not allow_pickle:
            raise
    return _frame(Codec.PICKLE, _pickle(value))


def _encode(value: Any) -> bytes:
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
    if nests_deeper_than(value, MAX_DEPTH):
        raise NestingTooDeepError(f"nests lists, tuples or dicts more than MAX_DEPTH={MAX_DEPTH} deep")
    return _frame(Codec.MSGPACK, _packb(value))


def frame_crc(frame: bytes | memoryview) -> int:
    """The CRC-32 recorded in a frame's header."""
    return HEADER.unpack_from(frame)[5]


def decode(frame: bytes | memoryview, allow_pickle: bool = False, expected_crc: int | None = None) -> Any:
    """The value in ``frame``, after checking magic, version, length and CRC.

    ``expected_crc`` (from the metadata ``put`` returned) must match the header's when given: a frame
    that is intact but is not the value that was put is refused too. Never crashes on any bytes: a payload
    that does not decode to a value ``encode`` could have written (e.g. nesting past ``MAX_DEPTH``) is
    CORRUPT_VALUE.

    Raises:
        CodecError: with ``code`` CORRUPT_VALUE, PAYLOAD_CHECKSUM_MISMATCH (the frame's bytes fail its own CRC: a
            torn or damaged read, retried), METADATA_MISMATCH (an intact frame, but not the one ``expected_crc``
            names: metadata of another value, not retried) or PICKLE_NOT_ALLOWED.
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
        raise CodecError(ErrorCode.PAYLOAD_CHECKSUM_MISMATCH, "frame checksum does not match its contents")
    if expected_crc is not None and crc != expected_crc:
        raise CodecError(ErrorCode.METADATA_MISMATCH, "stored value is not the one its metadata describes")
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
        value = _unpackb(bytes(payload))
        if nests_deeper_than(value, MAX_DEPTH):
            raise CodecError(ErrorCode.CORRUPT_VALUE, f"value nests more than {MAX_DEPTH} containers deep")
        return value
    if not allow_pickle:
        raise CodecError(ErrorCode.PICKLE_NOT_ALLOWED, "refusing to unpickle a stored value (allow_pickle is off)")
    return pickle.loads(payload)
