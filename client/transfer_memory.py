"""``TransferMemory``: memory the store reads into and writes from that is reused, not fresh on every call, and on
RDMA registered once, not per call.

Mooncake's ``BufferPool`` (0.3.13) leases regions of the store's local buffer (``local_buffer_size``), which the
store registered with its transfer engine once, at set-up. A lease lives as long as the last Python object that
views its memory; then its region goes back to the pool. So:

* **reads** of raw tensors land in leases, and the tensor ``get`` returns *is* a view of its lease: the caller owns
  it like any tensor, and its region returns to the pool when the caller drops it (and every view of it). The
  pages stay resident, where fresh memory from the allocator costs a page fault per 4 KiB on first touch (a
  100 x 1 MiB read: 25,600 faults, 100 ms instead of 55 ms; ``bench/bench.py``). Over TCP only destinations of at
  least ``POOLED_MIN_BYTES`` are leased (smaller ones come warm from the allocator's free lists anyway); with
  registration (RDMA), every destination and staging block is leased;
* **writes** with registration stage payloads (copied) into one lease per chunk, instead of registering the
  caller's memory on every call (TQ issue 169: registration was 85% of the read time on RDMA).

The pool never grows past the local buffer: it asks to register an overflow region only when the local buffer
is full or fragmented, and ``_PoolStore`` refuses that, so ``lease`` answers None and the caller takes fresh
memory (registered per call with ``Registrations`` where registration is on). No local buffer
(``local_buffer_size: 0``), a store that is not Mooncake's, or a build without ``BufferPool``: always None.

Memory handed out stays valid after ``close()``: each lease holds the local buffer's allocator alive.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

POOLED_MIN_BYTES = 128 << 10
"""Over TCP, destinations smaller than this come from the allocator (glibc's default mmap threshold: below it, freed
memory is reused warm; above it, it goes back to the system and comes back page by page)."""


class _PoolStore:
    """What ``BufferPool`` is given as its store: the client's store's ``PyClient`` (through the store's
    ``_get_pyclient_capsule``, which wrappers pass through), and ``register_buffer`` answering "no", so that the pool
    never registers an overflow region per lease."""

    def __init__(self, store: Any) -> None:
        self._capsule = store._get_pyclient_capsule

    def _get_pyclient_capsule(self) -> Any:
        return self._capsule()

    def register_buffer(self, ptr: int, size: int) -> int:
        return -1

    def unregister_buffer(self, ptr: int) -> int:
        return 0


class TransferMemory:
    """Leases of the store's local buffer (see the module); thread-safe. ``register``: the client registers the
    memory its transfers use (RDMA), so every transfer should use leases."""

    def __init__(self, store: Any, local_buffer_size: int, register: bool) -> None:
        self.register = register
        self._pool: Any = None
        self._lock = threading.Lock()
        self._fallbacks = 0
        if local_buffer_size <= 0 or getattr(store, "_get_pyclient_capsule", None) is None:
            return
        try:
            from mooncake.store import BufferPool
        except ImportError:
            return
        try:
            self._pool = BufferPool(_PoolStore(store), max_bytes=local_buffer_size, alignment=64)
        except Exception as exc:  # noqa: BLE001 - no pool: fresh memory, as without a local buffer
            logger.warning("Mooncake BufferPool unavailable (%s): transfers use fresh memory", exc)
            self._pool = None

    @property
    def available(self) -> bool:
        """Whether leases can be had at all (a pool over a local buffer)."""
        return self._pool is not None

    @property
    def fallbacks(self) -> int:
        """How many leases the local buffer could not give (full or fragmented): each took fresh memory instead."""
        return self._fallbacks

    def wants(self, size: int) -> bool:
        """Whether a destination of ``size`` bytes should be leased."""
        return self._pool is not None and (self.register or size >= POOLED_MIN_BYTES)

    def lease(self, size: int) -> tuple[int, memoryview] | None:
        """``size`` bytes of the local buffer, registered: (address, a writable memoryview that holds the lease
        while it, or anything made from it, lives); None when the pool has no room (or there is no pool)."""
        pool = self._pool
        if pool is None:
            return None
        try:
            lease = pool.acquire(size, block=False)
        except RuntimeError:  # exhausted, fragmented (the overflow registration was refused), or closed
            with self._lock:
                self._fallbacks += 1
            return None
        return lease.ptr, lease.buffer

    def close(self) -> None:
        """No more leases; those handed out stay valid until their views are freed."""
        self._pool = None
