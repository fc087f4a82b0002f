"""The store call of one chunk, one class per operation: what the retry loop calls on each attempt.

Each is built for the keys of one chunk (positions ``0..n-1`` of that chunk) and called with the positions
still pending; it returns one code per pending position and the bytes moved (see ``attempts.ChunkCall``).
Memory the store reads from or writes into is registered through the chunk's ``Registrations``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import codec, plans
from .codes import ErrorCode
from .store import Registrations


class PutChunk:
    """Writes (inserts or overwrites) ``items`` under ``keys`` with ``batch_upsert_from``."""

    __slots__ = ("_store", "_keys", "_items", "_replicate")

    def __init__(
        self, store: Any, keys: Sequence[str], items: Sequence[plans.PutItem], replicate: Any, regs: Registrations
    ) -> None:
        self._store = store
        self._keys = keys
        self._items = items
        self._replicate = replicate
        for item in items:
            regs.add(item.ptr, item.size)

    def __call__(self, pending: list[int]) -> tuple[Sequence[int], int]:
        sel = [self._items[p] for p in pending]
        codes = self._store.batch_upsert_from(
            [self._keys[p] for p in pending], [i.ptr for i in sel], [i.size for i in sel], self._replicate
        )
        return codes, sum(i.size for i, c in zip(sel, codes, strict=False) if c == 0)


class GetChunk:
    """Reads ``keys`` as ``read_plans`` say with ``batch_get_into``, verifies each value, and keeps it in
    ``values`` (in key order; None until read). A key whose bytes fail a check fails with the check's code.

    Destinations of known size are allocated once, up front; a frame of unknown size asks the store for its
    size on every attempt (it may have been overwritten in between).
    """

    __slots__ = ("_store", "_keys", "_plans", "_regs", "_allow_pickle", "_max_value_bytes", "_dest", "values")

    def __init__(
        self,
        store: Any,
        keys: Sequence[str],
        read_plans: Sequence[plans.ReadPlan],
        regs: Registrations,
        allow_pickle: bool,
        max_value_bytes: int,
    ) -> None:
        self._store = store
        self._keys = keys
        self._plans = read_plans
        self._regs = regs
        self._allow_pickle = allow_pickle
        self._max_value_bytes = max_value_bytes
        self._dest: dict[int, tuple[int, int, Any]] = {}  # position -> (pointer, size, holder)
        self.values: list[Any] = [None] * len(keys)
        for pos, plan in enumerate(read_plans):
            if plan.size is not None:
                self._allocate(pos, plan.size)

    def _allocate(self, pos: int, size: int) -> None:
        ptr, holder = plans.allocate(self._plans[pos], size)
        self._regs.add(ptr, size)
        self._dest[pos] = (ptr, size, holder)

    def _sized(self, pos: int) -> int:
        """0 when position ``pos`` has a destination of the size stored now, else its failure code."""
        if self._plans[pos].size is not None:
            return 0
        size = self._store.get_size(self._keys[pos])
        if size < 0:
            return size
        if size == 0 or size > self._max_value_bytes:
            return ErrorCode.SIZE_MISMATCH
        if pos not in self._dest or self._dest[pos][1] != size:
            self._allocate(pos, size)
        return 0

    def __call__(self, pending: list[int]) -> tuple[Sequence[int], int]:
        codes = [self._sized(pos) for pos in pending]
        reading = [j for j, code in enumerate(codes) if code == 0]  # indexes into pending
        if not reading:
            return codes, 0
        dest = [self._dest[pending[j]] for j in reading]
        keys = [self._keys[pending[j]] for j in reading]
        got = self._store.batch_get_into(keys, [d[0] for d in dest], [d[1] for d in dest])
        if len(got) != len(reading):
            return [ErrorCode.INTERNAL_ERROR] * len(pending), 0
        nbytes = 0
        for j, (_, size, holder), n in zip(reading, dest, got, strict=True):
            pos = pending[j]
            if n < 0:
                codes[j] = n
            elif n != size:
                codes[j] = ErrorCode.SIZE_MISMATCH
            else:
                try:
                    self.values[pos] = plans.finish(self._plans[pos], holder, self._allow_pickle)
                    nbytes += n
                except codec.CodecError as exc:
                    codes[j] = exc.code
        return codes, nbytes


class ClearChunk:
    """Removes ``keys`` with ``batch_remove``, forced: read leases do not block it."""

    __slots__ = ("_store", "_keys")

    def __init__(self, store: Any, keys: Sequence[str]) -> None:
        self._store = store
        self._keys = keys

    def __call__(self, pending: list[int]) -> tuple[Sequence[int], int]:
        return self._store.batch_remove([self._keys[p] for p in pending], True), 0
