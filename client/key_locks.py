"""``KeyLocks``: one writer per key at a time within a client.

Mooncake mis-handles two overlapping writes of one key from one store instance (all threads of a client share
it): the second preempts the first, the first's end-of-write then marks the second's fresh buffer complete
before it is written (readers get zeros or another key's bytes) and the first's buffers stay parked in the
master for 600 s or more, so a store under that pattern fills up (``docs/mooncake-races.md``). Writes of the same
key through one client therefore run one after another; writes from different store instances are told apart
by the master and need nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence


class KeyLocks:
    """A set of keys held for writing; ``holding(keys)`` waits until none of ``keys`` is held, then holds all of
    them at once (all or nothing, so two callers cannot deadlock), and releases them on exit. Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: set[str] = set()
        self._waiting = 0

    @contextlib.contextmanager
    def holding(self, keys: Sequence[str]) -> Iterator[None]:
        with self._cond:
            if not self._held.isdisjoint(keys):
                self._waiting += 1
                try:
                    while not self._held.isdisjoint(keys):
                        self._cond.wait()
                finally:
                    self._waiting -= 1
            self._held.update(keys)
        try:
            yield
        finally:
            with self._cond:
                self._held.difference_update(keys)
                self._cond.notify_all()

    def held(self) -> int:
        """How many keys are held now."""
        with self._cond:
            return len(self._held)

    def waiting(self) -> int:
        """How many callers wait for a key another holds."""
        with self._cond:
            return self._waiting
