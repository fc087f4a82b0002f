"""Storage-node health: which storage endpoints to route around. A pure policy object, with time injected.

Modelled on Envoy's outlier detection. Evidence comes from the client's own transfers (``replica_routing.py``):
a confirmed failure (an endpoint that failed a key's transfer and then a probe, or a direct read) or a success
(a probe answered, a key read or written there). An endpoint with ``consecutive_failures`` failures and no
success in between is *ejected* for ``base_ejection_s`` times the number of times it has been ejected (capped at
``max_ejection_s``), unless that would eject more than ``max_ejected_share`` of the endpoints known, so that a
fault on the client's own side cannot eject every node. When its time runs out it is re-admitted (a success
re-admits it earlier), after a probe if the master still listed it meanwhile (``expired``): a refused probe ejects
it again, for longer; an endpoint the master no longer listed during its ejection is forgotten (the master dropped
the dead process, ``--client_ttl`` after its last heartbeat). Ten quiet ejection periods after its last failure
its ejection count starts again.

``NodeHealth`` is thread-safe and holds nothing but endpoint names (``host:port``), bounded by ``max_endpoints``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .numbers import is_int, is_number
from .retry import Clock

MAX_ENDPOINTS = 4096
"""Endpoints remembered at most (the storage processes of one cluster); the least recently seen are dropped."""


@dataclass(frozen=True)
class NodeHealthPolicy:
    """When to eject a storage endpoint and for how long (see the module). ``enabled`` False turns the whole
    node-loss handling off: no probes, no replica fallback, no steering, no fail-fast."""

    enabled: bool = True
    consecutive_failures: int = 1
    base_ejection_s: float = 5.0
    max_ejection_s: float = 300.0
    max_ejected_share: float = 0.5
    probe_timeout_s: float = 0.5
    read_lease_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"node_health.enabled must be true or false, got {self.enabled!r}")
        n = self.consecutive_failures
        if not is_int(n) or not 1 <= n <= 1000:
            raise ValueError(f"node_health.consecutive_failures must be an integer from 1 to 1000, got {n!r}")
        for name, low, high in (
            ("base_ejection_s", 0.0, 86400.0),
            ("max_ejection_s", 0.0, 86400.0),
            ("max_ejected_share", 0.0, 1.0),
            ("probe_timeout_s", 0.001, 60.0),
            ("read_lease_s", 0.001, 3600.0),
        ):
            value = getattr(self, name)
            if not is_number(value) or not low <= value <= high:
                raise ValueError(f"node_health.{name} must be a number from {low:g} to {high:g}, got {value!r}")
        if self.max_ejection_s < self.base_ejection_s:
            raise ValueError(
                f"node_health.max_ejection_s ({self.max_ejection_s}) must be >= "
                f"base_ejection_s ({self.base_ejection_s})"
            )

    def ejection_s(self, times_ejected: int) -> float:
        """How long the ``times_ejected``-th ejection (1-based) of one endpoint lasts."""
        return min(self.max_ejection_s, self.base_ejection_s * max(1, times_ejected))


class _State:
    __slots__ = ("failures", "times_ejected", "ejected_at", "ejected_until", "unverified", "last_failure", "last_seen",
                 "listed_at")  # fmt: skip

    def __init__(self, now: float) -> None:
        self.failures = 0  # consecutive, since the last success
        self.times_ejected = 0
        self.ejected_at = -math.inf
        self.ejected_until = -math.inf
        self.unverified = False  # ejected, and not yet probed or heard from since
        self.last_failure = -math.inf
        self.last_seen = now  # any news of it
        self.listed_at = -math.inf  # the master last listed a replica on it


class NodeHealth:
    """The health of every storage endpoint this client has seen (see the module).

    ``on_eject`` is called (outside the lock) with each endpoint as it is ejected, for telemetry.
    """

    def __init__(
        self,
        policy: NodeHealthPolicy | None = None,
        clock: Clock = time.monotonic,
        on_eject: Callable[[str], object] | None = None,
        max_endpoints: int = MAX_ENDPOINTS,
    ) -> None:
        self.policy = policy or NodeHealthPolicy()
        self._clock = clock
        self._on_eject = on_eject
        self._max = max_endpoints
        self._lock = threading.Lock()
        self._nodes: dict[str, _State] = {}
        self._any_ejected_until = -math.inf  # a cheap "is anything ejected" for the healthy path
        self._unverified = 0  # endpoints with ``unverified`` set

    def _state(self, endpoint: str, now: float) -> _State:
        state = self._nodes.get(endpoint)
        if state is None:
            if len(self._nodes) >= self._max:
                oldest = min(self._nodes, key=lambda e: self._nodes[e].last_seen)
                self._verified(self._nodes.pop(oldest))
            state = self._nodes[endpoint] = _State(now)
        state.last_seen = now
        return state

    def seen(self, endpoints: Iterable[str]) -> None:
        """The master listed a replica on each of ``endpoints``: they count as known (for the ejected share)."""
        now = self._clock()
        with self._lock:
            for endpoint in endpoints:
                self._state(endpoint, now).listed_at = now

    def _verified(self, state: _State) -> None:
        if state.unverified:
            state.unverified = False
            self._unverified -= 1

    def success(self, endpoint: str) -> None:
        """A transfer to or probe of ``endpoint`` succeeded: its failure count restarts, an ejection ends."""
        now = self._clock()
        with self._lock:
            state = self._state(endpoint, now)
            state.failures = 0
            self._verified(state)
            if state.ejected_until > now:
                state.ejected_until = now
                self._any_ejected_until = max((s.ejected_until for s in self._nodes.values()), default=-math.inf)
            if now - state.last_failure > 10 * self.policy.ejection_s(max(1, state.times_ejected)):
                state.times_ejected = 0

    def failure(self, endpoint: str) -> bool:
        """A confirmed failure of ``endpoint``; True if it is ejected now (by this failure or before)."""
        now = self._clock()
        with self._lock:
            state = self._state(endpoint, now)
            state.failures += 1
            state.last_failure = now
            if state.ejected_until > now:
                return True
            self._verified(state)
            if state.failures < self.policy.consecutive_failures or not self._may_eject(now):
                return False
            state.times_ejected += 1
            state.ejected_at = now
            state.ejected_until = now + self.policy.ejection_s(state.times_ejected)
            state.unverified = True
            self._unverified += 1
            self._any_ejected_until = max(self._any_ejected_until, state.ejected_until)
        if self._on_eject is not None:
            self._on_eject(endpoint)
        return True

    def _may_eject(self, now: float) -> bool:
        ejected = sum(1 for s in self._nodes.values() if s.ejected_until > now)
        return ejected + 1 <= self.policy.max_ejected_share * len(self._nodes)

    def any_ejected(self) -> bool:
        """Whether some endpoint may be ejected now, or its ejection ended unverified (two comparisons when neither:
        the healthy path's cost)."""
        return self._unverified > 0 or self._any_ejected_until > self._clock()

    def expired(self) -> list[str]:
        """The endpoints whose ejection ended unverified, to be probed now (each handed out once: report the answer
        with ``success`` or ``failure``). Of those, the ones the master did not list during their ejection are
        forgotten instead of returned."""
        now = self._clock()
        due: list[str] = []
        with self._lock:
            for endpoint, state in list(self._nodes.items()):
                if not state.unverified or state.ejected_until > now:
                    continue
                self._verified(state)
                if state.listed_at <= state.ejected_at:
                    del self._nodes[endpoint]
                else:
                    due.append(endpoint)
        return due

    def is_ejected(self, endpoint: str) -> bool:
        now = self._clock()
        with self._lock:
            state = self._nodes.get(endpoint)
            return state is not None and state.ejected_until > now

    def ejected(self) -> frozenset[str]:
        """The endpoints ejected now."""
        now = self._clock()
        with self._lock:
            return frozenset(e for e, s in self._nodes.items() if s.ejected_until > now)

    def ejected_count(self) -> int:
        return len(self.ejected())

    def healthy(self) -> list[str]:
        """The known endpoints not ejected now, most recently seen first."""
        now = self._clock()
        with self._lock:
            live = [(s.last_seen, e) for e, s in self._nodes.items() if s.ejected_until <= now]
        return [e for _, e in sorted(live, reverse=True)]
