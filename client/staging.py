"""``arena()``: staging memory a thread reuses from one put chunk to the next.

A chunk copies its small payloads (and writes every trailer) into staging memory. Fresh memory costs a page
fault per 4 KiB on first touch, which is about as much as the copy itself; reusing the same pages makes the
copy run at memory speed. One chunk runs at a time on a thread and its store call has returned before the
thread takes another chunk, so a per-thread arena is never written while the store reads it.
"""

from __future__ import annotations

import threading

import numpy as np

RETAIN_MAX_BYTES = 64 << 20
"""The most staging memory a thread keeps between chunks; a chunk that needs more gets one-off blocks."""

_ALIGN = 64


class Arena:
    """A bump allocator over one reused buffer: ``begin()`` at the start of a chunk, then ``take(n)`` blocks
    that stay valid until the next ``begin()`` on this thread."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)
        self._used = 0

    def begin(self) -> None:
        self._used = 0

    def take(self, size: int) -> np.ndarray:
        """A block of ``size`` bytes (64-byte aligned within the buffer)."""
        start = -(-self._used // _ALIGN) * _ALIGN
        if start + size > self._buf.size:
            if size > RETAIN_MAX_BYTES:
                return np.empty(size, dtype=np.uint8)  # too big to keep
            # Blocks taken before stay valid: they keep the old buffer alive.
            self._buf = np.empty(min(max(2 * self._buf.size, size, 1 << 20), RETAIN_MAX_BYTES), dtype=np.uint8)
            start = 0
        self._used = start + size
        return self._buf[start : start + size]

    @property
    def capacity(self) -> int:
        return int(self._buf.size)


_local = threading.local()


def arena() -> Arena:
    """This thread's arena."""
    found = getattr(_local, "arena", None)
    if found is None:
        found = _local.arena = Arena()
    return found
