"""``WrittenSizes``: the size of the object this client last wrote under each key, so that an overwrite of the same
size need not ask the master first.

A put must know what a key holds before it writes (``chunks.PutChunk``): an upsert that changes a key's size
parks the old buffer in the master for 600 s or more, so a key of another size is removed first. Asking costs two
RPCs per chunk (``batch_is_exist``, then ``batch_get_replica_desc``), the largest fixed cost of a small put. What
this client itself wrote last answers it for the common overwrite; the master is asked for the other keys.

It is a hint, never trusted for data: a key removed or evicted since is simply inserted by the upsert. What it
cannot see is another writer (another client, or a ``clear`` through another client followed by a write of
another size): an in-place upsert then changes the key's size and the master parks the old buffer, as a plain
upsert would (memory held for a while, no wrong data: reads check the trailer and write id). Bounded: the
least recently written keys are forgotten first. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

DEFAULT_MAX_KEYS = 1 << 18
"""Keys remembered (about 150 bytes each): 262,144 keys, about 40 MB at most."""


class WrittenSizes:
    """Key -> object size (payload and trailer) of this client's last successful write of it."""

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 0:
            raise ValueError(f"max_keys must be >= 0, got {max_keys}")
        self._max = max_keys
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, keys: Sequence[str]) -> list[int | None]:
        """The size last written under each key (None where unknown)."""
        with self._lock:
            get = self._sizes.get
            return [get(k) for k in keys]

    def wrote(self, items: Iterable[tuple[str, int]]) -> None:
        """``(key, size)`` pairs just written successfully."""
        if not self._max:
            return
        with self._lock:
            sizes = self._sizes
            for key, size in items:
                sizes[key] = size
                sizes.move_to_end(key)
            while len(sizes) > self._max:
                sizes.popitem(last=False)

    def forget(self, keys: Iterable[str]) -> None:
        """Keys whose stored state is unknown now (a failed write, a clear)."""
        with self._lock:
            pop = self._sizes.pop
            for key in keys:
                pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)
