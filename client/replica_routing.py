"""Routing around lost storage nodes: which replica to read, where to write, and which keys cannot be read now.

Used by ``GetChunk`` and ``PutChunk`` (``chunks.py``); the health bookkeeping is ``node_health.py``, the direct
reads ``replica_reader.py``. On the healthy path it costs one comparison per attempt (``degraded``); everything
else runs only after a key failed with a transfer-class code (``TRANSFER_CODES``) or while an endpoint is ejected.

* **Blame.** After a transfer failure the master is asked where the failed keys' replicas are (one
  ``batch_get_replica_desc``). A key was read from the replica Mooncake picks (the local one, else the first
  complete one listed: ``chosen``); that endpoint is probed. A refused probe is a confirmed failure of the
  endpoint (``NodeHealth.failure``), an answer a success: a key-level failure on a live node is retried as
  before.
* **Fallback read.** A failed key whose chosen endpoint is confirmed down or ejected, and that has another
  complete memory replica on an endpoint neither, is read from that replica directly, in the same attempt,
  batched per endpoint. Its bytes are checked exactly as a normal read's (size, trailer, key tag, write id,
  checksum).
* **Fail fast.** A key whose every replica is on an ejected endpoint fails at once with ``REPLICA_UNREACHABLE``
  (not retried). While anything is ejected, reads are planned before the store is called, so that no call
  waits on a dead endpoint (about 1 s per try after the first).
* **Steered writes.** While anything is ejected, or after a write failed with a transfer-class code, writes ask
  for the healthy endpoints first (``ReplicateConfig.preferred_segments``) and for no more replicas than there
  are healthy endpoints (a write with a replica on a dead node fails whole). Under ``P2PHANDSHAKE`` only this
  client's own segment can be named (see ``ReplicaRouter``).

What protects a replica during a direct read, from Mooncake's source (``master_service.cpp``,
``client_service.cpp``; v0.3.12.post1 and main, the 0.3.13 wheel between them): the same as under
``batch_get_into``. The replica query that precedes either read grants the key a read lease
(``--default_kv_lease_ttl``, 10 s by default; TQ sets 999999 s) that blocks eviction and non-forced removal;
``batch_get_into`` then fails a read that ended after the lease with ``LEASE_EXPIRED``, and so does this read
when it ends more than ``node_health.read_lease_s`` after its query (5 s, less than the default lease). Neither
read is protected from a forced removal (``clear`` with ``clear_force``) or an in-place overwrite (an upsert of
the same size marks the replicas PROCESSING but does not wait for readers); in both cases the bytes read can be
torn, and the end-to-end check fails them (``TRAILER_MISMATCH`` / ``PAYLOAD_CHECKSUM_MISMATCH``, retried). A
size-changing overwrite parks the old buffers for ``put_start_release_timeout`` (600 s) precisely because
readers may hold their descriptors; a read through them returns the old value, which the write id check fails
(``STALE_VALUE``) when the caller passed the metadata.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import replicas
from .codes import ErrorCode
from .node_health import NodeHealth
from .replicas import Location
from .retry import Clock

TRANSFER_CODES: frozenset[int] = frozenset({int(ErrorCode.TRANSFER_FAIL)})
"""Codes that say a transfer to or from a storage endpoint failed (as opposed to a key-level condition)."""

LEARN_KEYS = 16
"""Keys that succeeded in a failed attempt whose replicas are asked too: they name live endpoints (so that the
ejected share counts them, and writes can be steered to them)."""

MAX_PROBES = 64
"""Endpoints probed at most after one failed attempt."""


@dataclass
class RoutingReport:
    """What routing did in one attempt, for its span and metrics: endpoints confirmed down (a probe refused or
    unanswered after a failed transfer or direct read), keys read from another replica by the endpoint routed
    around, keys failed fast, and whether writes were steered."""

    down: set[str] = field(default_factory=set)
    fallbacks: Counter[str] = field(default_factory=Counter)
    unreachable: int = 0
    steered: bool = False

    def __bool__(self) -> bool:
        return bool(self.down or self.fallbacks or self.unreachable or self.steered)


class ReplicaRouter:
    """Routing decisions of one client (see the module); thread-safe (state is in ``NodeHealth``)."""

    def __init__(
        self,
        store: Any,
        health: NodeHealth,
        local_endpoint: str | None = None,
        clock: Clock = time.monotonic,
        endpoints_are_segments: bool = True,
    ) -> None:
        """``local_endpoint``: this client's own segment (``get_hostname()``), if it has one.
        ``endpoints_are_segments``: whether a replica's transport endpoint is also its segment's name, which
        ``preferred_segments`` takes. True with a metadata server (HTTP, etcd); False under ``P2PHANDSHAKE``, where
        Mooncake 0.3.13 names a segment ``host:<store port>`` but its replicas' endpoint ``host:<engine port>``, and
        no Python call maps one to the other: writes can then be steered only to this client's own segment."""
        self.store = store
        self.health = health
        self.local_endpoint = local_endpoint
        self.endpoints_are_segments = endpoints_are_segments
        self._clock = clock
        self.active = health.policy.enabled and hasattr(store, "batch_read_replicas")

    def degraded(self) -> bool:
        """Whether reads must be planned and writes steered now (some endpoint is ejected). Endpoints whose ejection
        just ended are probed first (``NodeHealth.expired``): a refused probe ejects them again, so that no call
        waits on a node that is still dead."""
        if not (self.active and self.health.any_ejected()):
            return False
        timeout = self.health.policy.probe_timeout_s
        for endpoint in self.health.expired():
            answer = self.store.probe_endpoint(endpoint, timeout)
            if answer is False:
                self.health.failure(endpoint)
            else:
                self.health.success(endpoint)
        return bool(self.health.ejected())

    def now(self) -> float:
        return self._clock()

    def where(self, keys: Sequence[str]) -> dict[str, list[Location]]:
        """The complete memory replicas of ``keys`` (absent or unanswered keys left out); their endpoints become
        known to the health state."""
        found = replicas.locations(self.store, keys) or {}
        self.health.seen({loc.endpoint for locs in found.values() for loc in locs})
        return found

    def chosen(self, locs: Sequence[Location]) -> Location | None:
        """The replica Mooncake's ``batch_get_into`` reads: this client's own, else the first listed."""
        for loc in locs:
            if loc.endpoint == self.local_endpoint:
                return loc
        return locs[0] if locs else None

    def alternative(self, locs: Sequence[Location], down: set[str]) -> Location | None:
        """A replica on an endpoint neither ejected nor in ``down``, this client's own first."""
        usable = [loc for loc in locs if loc.endpoint not in down and not self.health.is_ejected(loc.endpoint)]
        own = [loc for loc in usable if loc.endpoint == self.local_endpoint]
        return (own or usable or [None])[0]

    def unreachable(self, locs: Sequence[Location]) -> bool:
        """Whether every replica in ``locs`` (at least one) is on an ejected endpoint."""
        return bool(locs) and all(self.health.is_ejected(loc.endpoint) for loc in locs)

    def confirm(self, endpoints: Iterable[str], report: RoutingReport) -> set[str]:
        """Probe each of ``endpoints`` (an ejected one counts as down unprobed); record each answer in the health
        state; returns those down. A probe that cannot be made (no engine) leaves an endpoint up."""
        down: set[str] = set()
        timeout = self.health.policy.probe_timeout_s
        for endpoint in list(dict.fromkeys(endpoints))[:MAX_PROBES]:
            if endpoint == self.local_endpoint:
                continue
            if self.health.is_ejected(endpoint):
                down.add(endpoint)
                continue
            answer = self.store.probe_endpoint(endpoint, timeout)
            if answer is None:
                continue
            if answer:
                self.health.success(endpoint)
            else:
                self.health.failure(endpoint)
                down.add(endpoint)
        report.down |= down
        return down

    def lease_held(self, queried_at: float) -> bool:
        """Whether a read that ends now is still inside the read lease granted by a query at ``queried_at``."""
        return self._clock() - queried_at <= self.health.policy.read_lease_s

    def steered(self, base: Any, asked: int) -> Any:
        """A ``ReplicateConfig`` like ``base`` that prefers the healthy segments and asks for no more replicas than
        there are; ``base`` itself when none is known. Without segment names for endpoints (``P2PHANDSHAKE``) the
        one segment named is this client's own, so one replica is asked there; a pure client then only asks for no
        more replicas than there are healthy endpoints (Mooncake places them at random)."""
        healthy = self.health.healthy()
        if not healthy:
            return base
        if self.endpoints_are_segments:
            preferred, count = healthy, len(healthy)
        elif self.local_endpoint is not None:
            preferred, count = [self.local_endpoint], 1
        else:
            preferred, count = [], len(healthy)
        from mooncake.store import ReplicateConfig

        cfg = ReplicateConfig()
        cfg.replica_num = max(1, min(asked, count))
        cfg.with_hard_pin = base.with_hard_pin
        cfg.preferred_segments = preferred
        return cfg
