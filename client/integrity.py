"""The end-to-end check of every stored value: a 40-byte trailer stored after its payload, in the same object.

Every object the client writes is ``payload || trailer`` (stored format version 1). The payload is a raw
tensor's bytes or a codec frame; the trailer says whose bytes they are::

    offset size  field
    0      4     magic  b"TQMT"
    4      1     format version (1)
    5      1     flags: bit 0 = the CRC32C below covers the whole payload; bit 1 = it covers the payload's samples
                 (64 bytes at every 4 KiB and the last 64 bytes); neither = no payload CRC; bit 2 = the payload
                 is a codec frame (clear: a raw tensor's bytes)
    6      2     reserved (0)
    8      8     payload length in bytes
    16     8     key tag: the first 8 bytes of BLAKE2b(key) (the key's identity, not the key)
    24     8     write id: a random 63-bit number per ``put`` call (``put`` returns it in the metadata as "wid")
    32     4     CRC32C of the payload or of its samples (0 when neither flag is set)
    36     4     CRC32C of bytes 0..35 (a torn, zeroed or foreign trailer fails it)

A read is handed back only when the trailer is intact, names this key, the payload length is what was read,
the write id is the one the caller's metadata names (when it names one) and the payload CRC32C (whole or
sampled) matches. Anything else (zeros, another key's bytes, a torn or half-written object, a value in another format)
fails the key with a retryable client code: these are races in the store that a later read gets past; when
they persist, the key is named as failed. Nothing here touches the store: pure functions of bytes.
"""

from __future__ import annotations

import ctypes
import hashlib
import secrets
import struct
from collections.abc import Mapping
from typing import Any

import crc32c
import numpy as np

from . import codec
from .codes import ErrorCode

MAGIC = b"TQMT"
VERSION = 1
FLAG_CRC32C = 0x01
FLAG_SAMPLED_CRC32C = 0x02
FLAG_FRAME = 0x04
SAMPLE_STRIDE = 4096
SAMPLE_BYTES = 64
_HEAD = struct.Struct("<4sBBHQQQI")  # the trailer but its own CRC, which covers these 36 bytes
_WHOLE = struct.Struct(f"<{_HEAD.size}sI")  # the head, then its CRC32C
TRAILER_SIZE = _HEAD.size + 4  # 40


def key_tag(key: str) -> int:
    """The 64-bit identity of ``key`` written in its trailer."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def new_write_id() -> int:
    """A fresh, non-zero 63-bit write id (one per ``put`` call)."""
    return secrets.randbits(63) | 1


_memory_at = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_at.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_memory_at.restype = ctypes.py_object
_PYBUF_READ = 0x100


def memory_at(ptr: int, size: int) -> memoryview:
    """A read-only memoryview of the ``size`` bytes at address ``ptr``, which must stay allocated while it is used
    (it holds nothing alive). Under 1 us; a ctypes array over the same bytes costs about 12 us for every size not
    seen before (a new ctypes type), which jagged values are."""
    return _memory_at(ptr, size, _PYBUF_READ)


def payload_crc(ptr: int, size: int) -> int:
    """CRC32C of ``size`` bytes at address ``ptr`` (the GIL is released for large buffers)."""
    return crc32c.crc32c(memory_at(ptr, size)) if size else 0


def sampled_crc(data: Any) -> int:
    """CRC32C of the samples of ``data`` (a buffer): ``SAMPLE_BYTES`` at every ``SAMPLE_STRIDE``, then the last
    ``SAMPLE_BYTES``. A 64th of the bytes, yet any other content written over 4 KiB or more of it changes it."""
    a = np.frombuffer(data, dtype=np.uint8)
    whole = a.size - a.size % SAMPLE_STRIDE
    head = np.ascontiguousarray(a[:whole].reshape(-1, SAMPLE_STRIDE)[:, :SAMPLE_BYTES])
    crc = crc32c.crc32c(a[whole : whole + SAMPLE_BYTES], crc32c.crc32c(head))  # and the partial last stride's
    return crc32c.crc32c(a[-SAMPLE_BYTES:], crc)


def pack_into(
    buf: Any, offset: int, tag: int, write_id: int, length: int, crc: int | None, flags: int = FLAG_CRC32C
) -> None:
    """Write the trailer of a payload of ``length`` bytes into ``buf[offset:offset + TRAILER_SIZE]``.
    ``crc`` is the payload's CRC32C (``flags``: of all of it, or of its samples), or None to write none."""
    flags = flags if crc is not None else flags & ~(FLAG_CRC32C | FLAG_SAMPLED_CRC32C)
    head = _HEAD.pack(MAGIC, VERSION, flags, 0, length, tag, write_id, crc or 0)
    _WHOLE.pack_into(buf, offset, head, crc32c.crc32c(head))


def pack_for(
    buf: Any, offset: int, tag: int, write_id: int, ptr: int, length: int, full: bool, frame: bool = False
) -> None:
    """``pack_into`` with the payload CRC32C of the ``length`` bytes at ``ptr``: of all of them when ``full``, else
    of their samples (payloads under two samples' worth are covered whole); ``frame``: the payload is a frame."""
    kind = FLAG_FRAME if frame else 0
    if full or length < 2 * SAMPLE_STRIDE:
        pack_into(buf, offset, tag, write_id, length, payload_crc(ptr, length), FLAG_CRC32C | kind)
    else:
        pack_into(buf, offset, tag, write_id, length, sampled_crc(memory_at(ptr, length)), FLAG_SAMPLED_CRC32C | kind)


def check(view: memoryview, tag: int, write_id: int | None, frame: bool | None = None) -> int:
    """0 when ``view`` (a whole object as read: payload then trailer) is the value written under the key whose
    tag is ``tag`` (by write ``write_id``, when not None; a frame or a raw tensor as ``frame`` says, when not
    None), else the client code saying why not."""
    n = len(view)
    if n < TRAILER_SIZE:
        return ErrorCode.TRAILER_MISMATCH
    head = view[n - TRAILER_SIZE : n - 4]
    magic, version, flags, _, length, stored_tag, stored_wid, stored_crc = _HEAD.unpack(head)
    if magic != MAGIC or version != VERSION or crc32c.crc32c(head) != struct.unpack_from("<I", view, n - 4)[0]:
        return ErrorCode.TRAILER_MISMATCH
    if stored_tag != tag or length != n - TRAILER_SIZE:
        return ErrorCode.TRAILER_MISMATCH
    if write_id is not None and stored_wid != write_id:
        return ErrorCode.STALE_VALUE
    if frame is not None and bool(flags & FLAG_FRAME) != frame:
        return ErrorCode.TYPE_MISMATCH  # a frame read as a raw tensor, or the other way round
    if flags & FLAG_CRC32C and crc32c.crc32c(view[:length]) != stored_crc:
        return ErrorCode.PAYLOAD_CHECKSUM_MISMATCH
    if flags & FLAG_SAMPLED_CRC32C and (length < SAMPLE_BYTES or sampled_crc(view[:length]) != stored_crc):
        return ErrorCode.PAYLOAD_CHECKSUM_MISMATCH
    return 0


def expected_write_id(key: str, meta: Any) -> int | None:
    """The write id named by ``put``'s metadata for ``key`` (None when it names none, e.g. no metadata);
    ValueError when the metadata carries one that no ``put`` could have returned."""
    if not isinstance(meta, Mapping) or "wid" not in meta:
        return None
    wid = meta["wid"]
    if type(wid) is not int or not 0 < wid < 1 << 63:
        raise ValueError(f"custom_backend_meta for key {key!r} is not metadata returned by put: {meta!r}")
    return wid


def seal(key: str, payload: bytes, write_id: int = 1, checksum: bool = False, frame: bool | None = None) -> bytes:
    """``payload`` followed by the trailer a ``put`` of it under ``key`` writes: the stored object, for tests
    and tools that write with the raw store. ``frame`` None: a frame when ``payload`` starts with a frame's
    magic."""
    out = bytearray(len(payload) + TRAILER_SIZE)
    out[: len(payload)] = payload
    crc = crc32c.crc32c(payload) if checksum else None
    frame = payload[: len(codec.MAGIC)] == codec.MAGIC if frame is None else frame
    pack_into(out, len(payload), key_tag(key), write_id, len(payload), crc, FLAG_CRC32C | (FLAG_FRAME if frame else 0))
    return bytes(out)
