"""``WrittenKeys``: the keys this client wrote last, so that an overwrite need not first ask whether its key exists.

A put must know what a key holds before it writes (``chunks.PutChunk``): an upsert that changes a key's size
parks the old buffer in the master for 600 s or more, so a key of another size is removed first. Asking is two
RPCs (``batch_is_exist``, then ``batch_get_replica_desc`` for the keys that exist: the second logs an error line
for every key it is asked about that does not exist, so it is not asked about keys that may not). For a key this
client wrote, the first is skipped: its size is asked straight away. The size itself always comes from the
master, never from here (two writers of one key with different sizes would otherwise upsert over each other's
size and fill the store with parked buffers).

A hint only: a key removed or evicted since is answered as absent, and written as new. Bounded: the least
recently written keys are forgotten first. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

DEFAULT_MAX_KEYS = 1 << 18
"""Keys remembered: 262,144, about 50 MiB at most with keys of about 30 characters (measured)."""


class WrittenKeys:
    """The keys of this client's latest successful writes."""

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 0:
            raise ValueError(f"max_keys must be >= 0, got {max_keys}")
        self._max = max_keys
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def wrote_any(self, keys: Sequence[str]) -> list[bool]:
        """Whether this client wrote each key last (as far as it remembers)."""
        with self._lock:
            known = self._keys
            return [k in known for k in keys]

    def wrote(self, keys: Iterable[str]) -> None:
        """Keys just written successfully."""
        if not self._max:
            return
        with self._lock:
            known = self._keys
            for key in keys:
                known[key] = None
                known.move_to_end(key)
            while len(known) > self._max:
                known.popitem(last=False)

    def forget(self, keys: Iterable[str]) -> None:
        """Keys whose stored state is unknown now (a failed write, a clear)."""
        with self._lock:
            pop = self._keys.pop
            for key in keys:
                pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)
