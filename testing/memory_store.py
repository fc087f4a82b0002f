"""``InMemoryStore``: a stand-in for ``MooncakeDistributedStore`` that keeps values in this process.

For tests of code on top of the client (and of the client's own logic) that need no Mooncake process:
``MooncakeBatchClient(config, store=InMemoryStore())``. It implements the calls the client makes, with the
real binding's signatures and per-key codes, as Mooncake 0.3.13 answers them: ``-704`` for a missing key,
``-600`` for a destination too small or a size of 0, ``-200`` when ``capacity`` is full (an overwrite of a
different size needs room for the new bytes before the old ones are freed; one of the same size is done in
place), and ``batch_put_from`` on an existing key answers 0 and keeps the old value. It copies bytes from and
into the caller's memory as the real one does. Wrap it in a
``FaultInjectingStore`` to fail chosen keys with chosen codes.

It is not a model of Mooncake's transfers, replicas, leases or timing: failover, chaos and anything about the
real store belong on real processes (``tq_mooncake.cluster``). After ``close()`` every call raises
``RuntimeError`` (the real binding would crash the process).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from tq_mooncake.client.codes import ErrorCode

OK = 0


class _Replica:
    """What ``batch_get_replica_desc`` lists for one copy: a memory replica, complete, of ``size`` bytes."""

    class _Status:
        name = "COMPLETE"

    def __init__(self, size: int) -> None:
        self.status = self._Status()
        self._memory = SimpleNamespace(
            buffer_descriptor=SimpleNamespace(size=size, buffer_address=0, transport_endpoint="memory:0")
        )

    def is_memory_replica(self) -> bool:
        return True

    def get_memory_descriptor(self) -> Any:
        return self._memory


class InMemoryStore:
    """Keys to bytes, in memory; thread-safe. ``capacity``: total bytes it holds at most (None: no limit)."""

    def __init__(self, capacity: int | None = None, hostname: str = "127.0.0.1:12345") -> None:
        self.capacity = capacity
        self._hostname = hostname
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.registered: dict[int, int] = {}  # pointer -> size, of the buffers registered now

    # ------------------------------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("InMemoryStore used after close()")

    def _used(self) -> int:
        return sum(len(v) for v in self._data.values())

    def _write(self, keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int], overwrite: bool) -> list[int]:
        self._check_open()
        if not len(keys) == len(ptrs) == len(sizes):
            return [int(ErrorCode.INVALID_PARAMS)] * len(keys)
        codes = []
        with self._lock:
            for key, ptr, size in zip(keys, ptrs, sizes, strict=True):
                if size <= 0:
                    codes.append(int(ErrorCode.INVALID_PARAMS))
                    continue
                old = self._data.get(key)
                if old is not None and not overwrite:  # Mooncake's put of an existing key: success, no change
                    codes.append(OK)
                    continue
                in_place = old is not None and len(old) == size
                if self.capacity is not None and not in_place and self._used() + size > self.capacity:
                    codes.append(int(ErrorCode.NO_AVAILABLE_HANDLE))
                    continue
                self._data[key] = ctypes.string_at(ptr, size)
                codes.append(OK)
        return codes

    # ------------------------------------------------------------------------------------ the binding's calls
    def batch_upsert_from(self, keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int], config: Any = None):
        """Insert or overwrite each key with ``sizes[i]`` bytes at ``ptrs[i]``; per-key codes."""
        return self._write(keys, ptrs, sizes, overwrite=True)

    def batch_put_from(self, keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int], config: Any = None):
        """Insert each key; an existing key keeps its value (and answers 0, as Mooncake does); per-key codes."""
        return self._write(keys, ptrs, sizes, overwrite=False)

    def batch_put_from_multi_buffers(
        self,
        keys: Sequence[str],
        all_ptrs: Sequence[Sequence[int]],
        all_sizes: Sequence[Sequence[int]],
        config: Any = None,
    ) -> list[int]:
        """Insert each key with the concatenation of its buffers; an existing key keeps its value (and answers 0,
        as Mooncake does); per-key codes."""
        self._check_open()
        if not len(keys) == len(all_ptrs) == len(all_sizes):
            return [int(ErrorCode.INVALID_PARAMS)] * len(keys)
        joined = []
        for ptrs, sizes in zip(all_ptrs, all_sizes, strict=True):
            if len(ptrs) != len(sizes) or any(size <= 0 for size in sizes):
                joined.append(b"")
            else:
                joined.append(b"".join(ctypes.string_at(p, n) for p, n in zip(ptrs, sizes, strict=True)))
        holders = [ctypes.create_string_buffer(data, max(len(data), 1)) for data in joined]
        return self._write(keys, [ctypes.addressof(h) for h in holders], [len(d) for d in joined], overwrite=False)

    def batch_get_into(self, keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int]) -> list[int]:
        """Copy each value into ``ptrs[i]`` (room for ``sizes[i]`` bytes); per-key byte count or code."""
        self._check_open()
        if not len(keys) == len(ptrs) == len(sizes):
            return [int(ErrorCode.INVALID_PARAMS)] * len(keys)
        out = []
        with self._lock:
            for key, ptr, size in zip(keys, ptrs, sizes, strict=True):
                value = self._data.get(key)
                if value is None:
                    out.append(int(ErrorCode.OBJECT_NOT_FOUND))
                elif len(value) > size:
                    out.append(int(ErrorCode.INVALID_PARAMS))
                else:
                    ctypes.memmove(ptr, value, len(value))
                    out.append(len(value))
        return out

    def get_size(self, key: str) -> int:
        self._check_open()
        with self._lock:
            value = self._data.get(key)
        return len(value) if value is not None else int(ErrorCode.OBJECT_NOT_FOUND)

    def is_exist(self, key: str) -> int:
        self._check_open()
        with self._lock:
            return int(key in self._data)

    def batch_get_replica_desc(self, keys: Sequence[str]) -> dict[str, list[Any]]:
        """One complete memory replica per key held (absent keys are left out), shaped as the binding's."""
        self._check_open()
        with self._lock:
            return {key: [_Replica(len(self._data[key]))] for key in keys if key in self._data}

    def batch_is_exist(self, keys: Sequence[str]) -> list[int]:
        """1 for each key held, 0 for each not."""
        self._check_open()
        with self._lock:
            return [int(key in self._data) for key in keys]

    def batch_remove(self, keys: Sequence[str], force: bool = False) -> list[int]:
        self._check_open()
        with self._lock:
            return [OK if self._data.pop(key, None) is not None else int(ErrorCode.OBJECT_NOT_FOUND) for key in keys]

    def remove_all(self, force: bool = False) -> int:
        self._check_open()
        with self._lock:
            n = len(self._data)
            self._data.clear()
        return n

    def register_buffer(self, ptr: int, size: int) -> int:
        self._check_open()
        with self._lock:
            self.registered[ptr] = size
        return OK

    def unregister_buffer(self, ptr: int) -> int:
        self._check_open()
        with self._lock:
            return OK if self.registered.pop(ptr, None) is not None else int(ErrorCode.INVALID_PARAMS)

    def get_hostname(self) -> str:
        self._check_open()
        return self._hostname

    def close(self) -> int:
        self._closed = True
        return OK

    # ------------------------------------------------------------------------------------ for tests
    def keys(self) -> list[str]:
        """The keys held now."""
        with self._lock:
            return list(self._data)

    def raw(self, key: str) -> bytes | None:
        """The bytes held under ``key`` (None if absent)."""
        with self._lock:
            return self._data.get(key)
