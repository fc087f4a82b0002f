"""The store call of one chunk, one class per operation: what the retry loop calls on each attempt.

Each is built for the keys of one chunk (positions ``0..n-1`` of that chunk) and called with the positions
still pending; it returns one code per pending position and the bytes moved (see ``attempts.ChunkCall``).
Memory the store reads from or writes into is registered through the chunk's ``Registrations``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import codec, integrity, plans, replicas, staging
from .codes import ErrorCode
from .replica_routing import LEARN_KEYS, TRANSFER_CODES, ReplicaRouter, RoutingReport
from .replicas import Location
from .store import Registrations
from .transfer_memory import TransferMemory
from .written_keys import WrittenKeys

COPY_MAX_BYTES = 64 << 10
"""Payloads of new keys up to this size are copied, with their trailer, into staging memory and written with
``batch_upsert_from`` (one transfer slice per key); larger ones are written zero-copy from their own memory
with the trailer as a second slice (``batch_put_from_multi_buffers``). Over TCP a second slice costs about
16 us, about what copying 64 KiB of cold memory costs on a 2-core machine (``bench/bench.py``)."""


QUERY_KEYS = 8192
"""Keys per existence query (``batch_is_exist``, then ``batch_get_replica_desc``): metadata RPCs, no transfer."""


def held_now(
    store: Any, keys: Sequence[str], written: WrittenKeys | None, router: ReplicaRouter | None
) -> list[replicas.Held | None]:
    """What each key holds now (None: nothing), for ``PutChunk``'s choice of write path, always as the master says
    it: the keys this client wrote last (``written``) with one ``batch_get_replica_desc``, the others with
    ``batch_is_exist`` first; ``QUERY_KEYS`` keys per RPC. The replicas' endpoints are read while an endpoint is
    ejected (``router``)."""
    degraded = router is not None and router.active and router.degraded()
    mine = written.wrote_any(keys) if written is not None else [False] * len(keys)
    held: list[replicas.Held | None] = [None] * len(keys)
    for ours, ask in ((True, replicas.described_objects), (False, replicas.held_objects)):
        positions = [i for i, m in enumerate(mine) if m is ours]
        for lo in range(0, len(positions), QUERY_KEYS):
            part = positions[lo : lo + QUERY_KEYS]
            for i, answer in zip(part, ask(store, [keys[i] for i in part], degraded), strict=True):
                held[i] = answer
    return held


class PutChunk:
    """Writes (inserts or overwrites) ``items`` under ``keys``, each payload followed by its trailer
    (``integrity.py``) in one object.

    Before the first attempt the call asks the master what each key holds now (``held_now``: one query for all
    its chunks, the keys it wrote last without asking whether they exist first):

    * nothing: a small payload (``COPY_MAX_BYTES``) is staged (copied with its trailer into a block,
      checksummed whole) and upserted; a large one is written zero-copy from its own memory with Mooncake's
      multi-buffer put, with a CRC32C of its samples (whole with ``checksum``);
    * an object of the same size: staged and upserted, replaced in place in one step (multi-buffer put would
      keep the old value and answer 0; removing first would leave the key absent to readers in between);
    * an object of another size, or the master did not say: removed (forced) first, then written as new; a key
      whose removal fails keeps that code for the attempt and is not written (a write would keep the old value).
      An upsert that changes a key's size parks the old buffer in the master for 600 s or more (measured: a 64 MB
      segment full after 85 such overwrites), so it is never used for one.

    With a ``router`` (``replica_routing.py``), writes are steered to healthy endpoints while one is ejected or
    after a transfer failure; a key replaced in place whose write failed so is removed and written as new (an
    in-place upsert reuses the old replicas' buffers, on the lost node too).
    """

    __slots__ = (
        "_store", "_keys", "_items", "_replicate", "_replica_num", "_regs", "_write_id", "_checksum", "_blocks",
        "_arena", "_staged", "_gather", "_routed", "_in_place", "_router", "_steer", "_remove_first", "_written",
        "_memory", "_stage_all", "_held", "replicas", "routing",
    )  # fmt: skip

    def __init__(
        self,
        store: Any,
        keys: Sequence[str],
        items: Sequence[plans.PutItem],
        held: Sequence[replicas.Held | None],
        replicate: Any,
        regs: Registrations,
        write_id: int,
        checksum: bool,
        replica_num: int = 1,
        router: ReplicaRouter | None = None,
        written: WrittenKeys | None = None,
        memory: TransferMemory | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._items = items
        self._written = written
        self._held = held  # what each key holds now: ``held_now``, asked once for all the chunks of the call
        self._memory = memory if memory is not None and memory.available else None
        # With registration and a pool, every payload is staged into one lease: nothing registered per call.
        self._stage_all = self._memory is not None and self._memory.register
        self._replicate = replicate
        self._replica_num = replica_num
        self._regs = regs
        self._write_id = write_id
        self._checksum = checksum
        self._blocks: list[np.ndarray] = []  # staging and trailer blocks, alive as long as the chunk
        self._arena = staging.arena()
        self._arena.begin()
        self._staged: dict[int, tuple[int, int]] = {}  # position -> (pointer, size) of payload and trailer
        self._gather: dict[int, int] = {}  # position -> pointer of its trailer (payload at items[pos].ptr)
        self._routed = False
        self._in_place: set[int] = set()
        self._router = router if router is not None and router.active else None
        self._steer = False  # a transfer failed: steer the retries
        self._remove_first: set[int] = set()  # positions to remove (forced) before they are written again
        self.replicas: dict[int, int | None] = {}
        """Complete replicas of each written position (asked of the master after the write when
        ``replica_num`` > 1; one replica is what a successful write of one means)."""
        self.routing: RoutingReport | None = None
        """What routing did in the last attempt (None where it did nothing)."""

    def release(self) -> None:
        """Drop the staging blocks (a failed call's memory, leases included, is freed now; see ``GetChunk``)."""
        self._blocks.clear()
        self._staged.clear()
        self._gather.clear()

    def _block(self, size: int) -> tuple[np.ndarray, int]:
        """A staging block of ``size`` bytes: this thread's arena, or a lease of the local buffer where every block
        must be registered (``_stage_all``) or it is larger than an arena keeps (fresh memory costs a page fault per
        4 KiB: staging 100 MiB of overwrites took 71 ms in one-off memory)."""
        wants_lease = self._memory is not None and (self._stage_all or size > staging.RETAIN_MAX_BYTES)
        leased = self._memory.lease(max(size, 1)) if wants_lease else None
        if leased is not None:
            block = np.frombuffer(leased[1], dtype=np.uint8)  # holds the lease as long as the chunk holds it
        else:
            block = self._arena.take(max(size, 1))
            self._regs.add(block.ctypes.data, size)
        self._blocks.append(block)
        return block, block.ctypes.data

    def _stage(self, positions: list[int]) -> None:
        """Copy the payloads at ``positions``, each followed by its trailer (whole CRC32C: the bytes are in cache
        now), into one new block."""
        if not positions:
            return
        T = integrity.TRAILER_SIZE
        block, base = self._block(sum(self._items[i].size + T for i in positions))
        offset = 0
        for i in positions:
            item = self._items[i]
            ctypes.memmove(base + offset, item.ptr, item.size)
            tag, frame = integrity.key_tag(self._keys[i]), "dtype" not in item.meta
            integrity.pack_for(block, offset + item.size, tag, self._write_id, base + offset, item.size, True, frame)
            self._staged[i] = (base + offset, item.size + T)
            offset += item.size + T

    def _zero_copy(self, positions: list[int]) -> None:
        """The trailers of the payloads at ``positions`` into one new block; the payloads stay where they are."""
        if not positions:
            return
        T = integrity.TRAILER_SIZE
        block, base = self._block(T * len(positions))
        for j, i in enumerate(positions):
            item = self._items[i]
            tag, frame = integrity.key_tag(self._keys[i]), "dtype" not in item.meta
            integrity.pack_for(block, j * T, tag, self._write_id, item.ptr, item.size, self._checksum, frame)
            self._gather[i] = base + j * T
            self._regs.add(item.ptr, item.size)

    def _route(self) -> None:
        """Decide each position's write path from what the store holds under its key (see the class)."""
        self._routed = True
        n = len(self._keys)
        T = integrity.TRAILER_SIZE
        router = self._router
        degraded = router is not None and router.degraded()
        ejected = router.health.ejected() if degraded else frozenset()
        sizes = [item.size + T for item in self._items]
        held = self._held
        # In place only where every replica is on a live endpoint (an in-place upsert writes into the old buffers).
        # Large payloads too, though they are copied: removing and writing them zero-copy would leave the key absent
        # in between, and a concurrent reader would get OBJECT_NOT_FOUND for a key that exists before and after.
        # With a registered pool every payload is staged (copied), a new large one too.
        in_place = [
            i for i in range(n) if (h := held[i]) is not None and h.size == sizes[i] and not h.endpoints & ejected
        ]  # fmt: skip
        self._in_place = set(in_place)
        self._remove_first.update(i for i in range(n) if held[i] is not None and i not in self._in_place)
        new = set(range(n)) - self._in_place
        small = {i for i in new if self._stage_all or self._items[i].size <= COPY_MAX_BYTES}
        self._stage(sorted(self._in_place | small))
        self._zero_copy(sorted(new - small))

    def _remove(self, positions: list[int], codes: dict[int, int]) -> None:
        """Remove (forced) the keys at ``positions`` before they are written again; a position whose key could not
        be removed keeps its code in ``codes`` and stays to be removed (a write now would keep the old value)."""
        got = self._store.batch_remove([self._keys[p] for p in positions], True)
        if len(got) != len(positions):
            got = [int(ErrorCode.INTERNAL_ERROR)] * len(positions)
        for p, code in zip(positions, got, strict=True):
            if code in (0, ErrorCode.OBJECT_NOT_FOUND):
                self._remove_first.discard(p)
            else:
                codes[p] = int(code)

    def __call__(self, pending: list[int]) -> tuple[Sequence[int], int]:
        if not self._routed:
            self._route()
        router = self._router
        self.routing = None  # made only when routing acts: nothing on the healthy path
        replicate = self._replicate
        if router is not None and (self._steer or router.degraded()):
            replicate = router.steered(self._replicate, self._replica_num)
            self.routing = RoutingReport(steered=replicate is not self._replicate)
        codes: dict[int, int] = {}
        again = [p for p in pending if p in self._remove_first]
        if again:
            self._remove(again, codes)
        staged = [p for p in pending if p in self._staged and p not in codes]
        gather = [p for p in pending if p in self._gather and p not in codes]
        if staged:
            got = self._store.batch_upsert_from(
                [self._keys[p] for p in staged],
                [self._staged[p][0] for p in staged],
                [self._staged[p][1] for p in staged],
                replicate,
            )
            codes.update(_per_key(staged, got))
        if gather:
            got = self._store.batch_put_from_multi_buffers(
                [self._keys[p] for p in gather],
                [[self._items[p].ptr, self._gather[p]] for p in gather],
                [[self._items[p].size, integrity.TRAILER_SIZE] for p in gather],
                replicate,
            )
            codes.update(_per_key(gather, got))
        result = [codes[p] for p in pending]
        written = [p for p, c in zip(pending, result, strict=True) if c == 0]
        failed = [p for p, c in zip(pending, result, strict=True) if c in TRANSFER_CODES]
        where: dict[str, list[Location]] | None = None
        if self._replica_num > 1 or (router is not None and failed):
            asked = written if self._replica_num > 1 else written[:LEARN_KEYS]
            keys = [self._keys[p] for p in asked]
            where = router.where(keys) if router is not None else None
            counts = (
                [len(where[k]) if k in where else None for k in keys]
                if where is not None
                else replicas.complete_replicas(self._store, keys)
            )
            if self._replica_num > 1:
                self.replicas.update(zip(written, counts, strict=True))
        if self._replica_num == 1:
            self.replicas.update(dict.fromkeys(written, 1))
        if self._written is not None:
            self._written.wrote(self._keys[p] for p in written)
            self._written.forget(self._keys[p] for p, c in zip(pending, result, strict=True) if c != 0)
        if router is not None and failed:
            if self.routing is None:
                self.routing = RoutingReport()
            self._after_transfer_failure(router, self.routing, failed, where or {})
        return result, sum(self._items[p].size for p in written)

    def _after_transfer_failure(
        self, router: ReplicaRouter, report: RoutingReport, failed: list[int], where: dict[str, list[Location]]
    ) -> None:
        """Some writes failed with a transfer-class code: the endpoints that just took writes are live; probe the
        other known ones (the failed writes' endpoints are not reported). If one is down (or ejected), the retries
        are steered and keys replaced in place are removed and written as new; else the failure was the keys' own
        and they are retried as they were."""
        live = {loc.endpoint for locs in where.values() for loc in locs}
        for endpoint in live:
            router.health.success(endpoint)
        down = router.confirm([e for e in router.health.healthy() if e not in live], report)
        if down or router.health.any_ejected():
            self._steer = True
            self._remove_first.update(p for p in failed if p in self._in_place)


def _per_key(positions: list[int], got: Sequence[int]) -> dict[int, int]:
    """Each position's code from a batch call's per-key results (all INTERNAL_ERROR if the call answered a list
    of the wrong length, as the binding does when it is not initialised)."""
    if len(got) != len(positions):
        return dict.fromkeys(positions, int(ErrorCode.INTERNAL_ERROR))
    return {p: int(c) for p, c in zip(positions, got, strict=True)}


class GetChunk:
    """Reads ``keys`` as ``read_plans`` say with ``batch_get_into``, checks each object's trailer (the key, the
    length, the write id in ``write_ids`` where known, the payload checksum where written), decodes each value
    and keeps it in ``values`` (in key order; None until read). A key whose bytes fail a check fails with the
    check's code.

    Destinations of known size are allocated once, up front; a frame of unknown size asks the store for its
    size on every attempt (it may have been overwritten in between).

    With a ``router`` (``replica_routing.py``): a key that failed with a transfer-class code on an endpoint that
    is down is read from another replica in the same attempt; while an endpoint is ejected, keys whose replica
    Mooncake would pick is there are read from another replica instead, and keys with no replica elsewhere fail
    with ``REPLICA_UNREACHABLE``.
    """

    __slots__ = (
        "_store", "_keys", "_plans", "_regs", "_allow_pickle", "_max_value_bytes", "_dest", "_tags", "_wids",
        "_router", "_memory", "values", "routing",
    )  # fmt: skip

    def __init__(
        self,
        store: Any,
        keys: Sequence[str],
        read_plans: Sequence[plans.ReadPlan],
        regs: Registrations,
        allow_pickle: bool,
        max_value_bytes: int,
        write_ids: Sequence[int | None] | None = None,
        router: ReplicaRouter | None = None,
        memory: TransferMemory | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._plans = read_plans
        self._memory = memory
        self._router = router if router is not None and router.active else None
        self.routing: RoutingReport | None = None
        self._regs = regs
        self._allow_pickle = allow_pickle
        self._max_value_bytes = max_value_bytes
        self._tags = [integrity.key_tag(k) for k in keys]
        self._wids = write_ids
        self._dest: dict[int, tuple[int, int, Any]] = {}  # position -> (pointer, object size, holder)
        self.values: list[Any] = [None] * len(keys)
        for pos, plan in enumerate(read_plans):
            if plan.size is not None:
                self._allocate(pos, plan.size + integrity.TRAILER_SIZE)

    def release(self) -> None:
        """Drop the destinations and values (a failed call's memory, leases included, is freed now, not whenever the
        exception's traceback, which holds this chunk, is collected)."""
        self._dest.clear()
        self.values = [None] * len(self._keys)

    def _allocate(self, pos: int, size: int) -> None:
        memory = self._memory
        leased = memory.lease(size) if memory is not None and memory.wants(size) else None
        if leased is not None:
            ptr, holder = plans.allocate(self._plans[pos], size, leased[1])
        else:
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
        if size <= integrity.TRAILER_SIZE:
            return ErrorCode.TRAILER_MISMATCH
        if size - integrity.TRAILER_SIZE > self._max_value_bytes:
            return ErrorCode.SIZE_MISMATCH
        if pos not in self._dest or self._dest[pos][1] != size:
            self._allocate(pos, size)
        return 0

    def _finish(self, pos: int, holder: Any, n: int) -> int:
        """Check and decode the object of ``n`` bytes read for position ``pos``; 0 or the failure code."""
        wid = self._wids[pos] if self._wids else None
        frame = self._plans[pos].kind is plans.ReadKind.FRAME
        code = integrity.check(integrity.memory_at(self._dest[pos][0], n), self._tags[pos], wid, frame)
        if code:
            return code
        try:
            self.values[pos] = plans.finish(self._plans[pos], holder, n - integrity.TRAILER_SIZE, self._allow_pickle)
        except codec.CodecError as exc:
            return exc.code
        return 0

    def _take(self, pos: int, n: int) -> tuple[int, int]:
        """The code of position ``pos`` whose read returned ``n`` (bytes or a code), and the payload bytes it
        delivered."""
        if n < 0:
            return n, 0
        _, size, holder = self._dest[pos]
        if n != size:
            return ErrorCode.SIZE_MISMATCH, 0
        code = self._finish(pos, holder, n)
        return code, (n - integrity.TRAILER_SIZE if code == 0 else 0)

    def __call__(self, pending: list[int]) -> tuple[Sequence[int], int]:
        router = self._router
        self.routing = None  # made only when routing acts: nothing on the healthy path
        codes = {pos: self._sized(pos) for pos in pending}
        reading = [pos for pos in pending if codes[pos] == 0]
        direct: dict[int, tuple[Location, str, float]] = {}  # position -> (replica, endpoint avoided, queried at)
        if router is not None and reading and router.degraded():
            report = self.routing = RoutingReport()
            queried_at = router.now()
            where = router.where([self._keys[p] for p in reading])
            for pos in reading:
                locs = where.get(self._keys[pos])
                chosen = router.chosen(locs) if locs else None
                if locs and chosen is not None and router.health.is_ejected(chosen.endpoint):
                    self._reroute(router, report, pos, locs, chosen, set(), direct, codes, queried_at)
        via_store = [pos for pos in reading if pos not in direct and codes[pos] == 0]
        nbytes = 0
        if via_store:
            dest = [self._dest[pos] for pos in via_store]
            got = self._store.batch_get_into(
                [self._keys[pos] for pos in via_store], [d[0] for d in dest], [d[1] for d in dest]
            )
            if len(got) != len(via_store):
                return [ErrorCode.INTERNAL_ERROR] * len(pending), 0
            for pos, n in zip(via_store, got, strict=True):
                codes[pos], moved = self._take(pos, int(n))
                nbytes += moved
        if router is not None:
            failed = [pos for pos in via_store if codes[pos] in TRANSFER_CODES]
            if failed:
                if self.routing is None:
                    self.routing = RoutingReport()
                self._after_transfer_failure(router, self.routing, failed, via_store, direct, codes)
        if direct and router is not None and self.routing is not None:  # direct reads come only from routing
            nbytes += self._read_direct(router, self.routing, direct, codes)
        return [codes[pos] for pos in pending], nbytes

    def _after_transfer_failure(
        self,
        router: ReplicaRouter,
        report: RoutingReport,
        failed: list[int],
        via_store: list[int],
        direct: dict[int, tuple[Location, str, float]],
        codes: dict[int, int],
    ) -> None:
        """Blame the endpoints the failed reads went to (probing them), and reroute the keys of those down."""
        queried_at = router.now()
        ok = [pos for pos in via_store if codes[pos] == 0][:LEARN_KEYS]
        where = router.where([self._keys[p] for p in failed + ok])
        for pos in ok:  # read just now from the replica Mooncake picks: that endpoint is live
            locs = where.get(self._keys[pos])
            chosen = router.chosen(locs) if locs else None
            if chosen is not None:
                router.health.success(chosen.endpoint)
        blamed = {}
        for pos in failed:
            locs = where.get(self._keys[pos])
            chosen = router.chosen(locs) if locs else None
            if chosen is not None:
                blamed[pos] = chosen
        down = router.confirm({loc.endpoint for loc in blamed.values()}, report)
        for pos, chosen in blamed.items():
            if chosen.endpoint in down:
                self._reroute(router, report, pos, where[self._keys[pos]], chosen, down, direct, codes, queried_at)

    def _reroute(
        self,
        router: ReplicaRouter,
        report: RoutingReport,
        pos: int,
        locs: list[Location],
        chosen: Location,
        down: set[str],
        direct: dict[int, tuple[Location, str, float]],
        codes: dict[int, int],
        queried_at: float,
    ) -> None:
        """Position ``pos``'s replica ``chosen`` is on an endpoint down or ejected: read another replica, or fail
        it fast when every replica is on an ejected endpoint (else its code stands and it is retried)."""
        alternative = router.alternative(locs, down | {chosen.endpoint})
        if alternative is not None:
            direct[pos] = (alternative, chosen.endpoint, queried_at)
            codes[pos] = 0
        elif router.unreachable(locs):
            codes[pos] = ErrorCode.REPLICA_UNREACHABLE
            report.unreachable += 1

    def _read_direct(
        self,
        router: ReplicaRouter,
        report: RoutingReport,
        direct: dict[int, tuple[Location, str, float]],
        codes: dict[int, int],
    ) -> int:
        """Read each position in ``direct`` from the replica named there; checks as ``batch_get_into``'s reads, and
        ``LEASE_EXPIRED`` for a read that ended past the read lease of its query. Returns the payload bytes."""
        T = integrity.TRAILER_SIZE
        items = []
        for pos, (loc, avoided, queried_at) in direct.items():
            size = self._dest[pos][1] if pos in self._dest else None
            if size != loc.size:
                if self._plans[pos].size is not None or not T < loc.size <= self._max_value_bytes + T:
                    codes[pos] = ErrorCode.SIZE_MISMATCH
                    continue
                self._allocate(pos, loc.size)
            items.append((pos, loc, avoided, queried_at))
        if not items:
            return 0
        got = self._store.batch_read_replicas(
            [self._keys[pos] for pos, *_ in items],
            [loc.endpoint for _, loc, *_ in items],
            [self._dest[pos][0] for pos, *_ in items],
            [loc.address for _, loc, *_ in items],
            [loc.size for _, loc, *_ in items],
        )
        if len(got) != len(items):
            for pos, *_ in items:
                codes[pos] = ErrorCode.INTERNAL_ERROR
            return 0
        nbytes = 0
        answered: set[str] = set()
        silent: set[str] = set()
        for (pos, loc, avoided, queried_at), n in zip(items, got, strict=True):
            n = int(n)
            if n < 0:
                codes[pos] = n
                if n in TRANSFER_CODES:
                    silent.add(loc.endpoint)
                continue
            answered.add(loc.endpoint)
            if not router.lease_held(queried_at):
                codes[pos] = ErrorCode.LEASE_EXPIRED
                continue
            codes[pos], moved = self._take(pos, n)
            nbytes += moved
            if codes[pos] == 0:
                report.fallbacks[avoided] += 1
        for endpoint in answered:
            router.health.success(endpoint)
        if silent - answered:  # blamed only once a probe confirms it: a failed read alone may be the key's own
            router.confirm(silent - answered, report)
        return nbytes


class ClearChunk:
    """Removes ``keys`` with ``batch_remove``; ``force`` (the default) removes keys under a read lease too."""

    __slots__ = ("_store", "_keys", "_force")

    def __init__(self, store: Any, keys: Sequence[str], force: bool = True) -> None:
        self._store = store
        self._keys = keys
        self._force = force

    def __call__(self, pending: list[int]) -> tuple[Sequence[int], int]:
        return self._store.batch_remove([self._keys[p] for p in pending], self._force), 0
