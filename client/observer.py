"""The hooks through which the retry loop reports what it does.

``attempts.run_chunk`` reports every attempt to an ``AttemptScope`` and the client reports every call to
an ``OperationScope``; ``Observer.operation`` opens the latter. The telemetry package implements them
with OpenTelemetry; ``NOOP_OBSERVER`` does nothing. Scopes receive counts and bounded code sets only,
never keys or values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tq_mooncake.telemetry.conventions import Operation, Outcome

from .codes import ErrorCode

if TYPE_CHECKING:
    from .replica_routing import RoutingReport


class AttemptScope(Protocol):
    """One store call on the pending keys of one chunk."""

    def end(self, failed: Counter[ErrorCode], nbytes: int, routing: RoutingReport | None = None) -> None:
        """The attempt returned; ``failed`` counts the keys that failed, by code; ``routing`` says what routing
        around lost storage nodes did in it (None: nothing)."""


class OperationScope(Protocol):
    """One client call (``put``, ``get`` or ``clear``) and everything it did."""

    def attempt(self, chunk: int, attempt: int, keys: int, backoff_s: float) -> AttemptScope:
        """Start attempt ``attempt`` (1-based) on chunk ``chunk`` with ``keys`` keys, after ``backoff_s`` sleep.

        May be called from worker threads.
        """

    def end(self, summary: OperationSummary) -> None:
        """The call is over (successfully or not)."""


class Observer(Protocol):
    def operation(self, operation: Operation, batch_size: int) -> OperationScope:
        """Start observing one call on ``batch_size`` keys."""

    def node_ejected(self, endpoint: str) -> None:
        """The client ejected storage endpoint ``endpoint`` (``host:port``): it routes around it for a while."""


@dataclass(frozen=True, slots=True, eq=False)
class OperationSummary:
    """What one call did, for the operation span and metrics. ``codes`` is the retry loop's final word: each
    failed key counted once, by the last code the loop saw for it (keys of a chunk that an exception stopped
    before the loop saw them fail have none). Observers report it as is; nothing re-classifies it."""

    outcome: Outcome
    attempts: int  # store calls made, over all chunks
    keys_ok: int  # succeeded on their first attempt
    keys_retried_ok: int  # succeeded after at least one failed attempt
    keys_failed: int
    retry_delay_s: float  # backoff slept, summed over chunks
    nbytes: int
    codes: Counter[ErrorCode] = field(default_factory=Counter)  # failed keys by their last code
    keys_under_replicated: int = 0  # puts: keys written with fewer replicas than replica_num


class _NoopAttempt:
    def end(self, failed: Counter[ErrorCode], nbytes: int, routing: RoutingReport | None = None) -> None:
        pass


class _NoopOperation:
    _attempt = _NoopAttempt()

    def attempt(self, chunk: int, attempt: int, keys: int, backoff_s: float) -> AttemptScope:
        return self._attempt

    def end(self, summary: OperationSummary) -> None:
        pass


class NoopObserver:
    _operation = _NoopOperation()

    def operation(self, operation: Operation, batch_size: int) -> OperationScope:
        return self._operation

    def node_ejected(self, endpoint: str) -> None:
        pass


NOOP_OBSERVER: Observer = NoopObserver()
