"""``RecordingObserver``: an ``Observer`` that keeps what the client told it, and passes it on.

The model is OpenTelemetry's in-memory exporter: the client is observed for real, and a test reads back
every operation and attempt. ``forward`` (default: nothing) receives everything too and may be switched at
any time, so one client can serve several tests or phases while each sees only its own telemetry.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from tq_mooncake.client.codes import ErrorCode
from tq_mooncake.client.observer import NOOP_OBSERVER, AttemptScope, Observer, OperationScope, OperationSummary
from tq_mooncake.telemetry.conventions import Operation, Outcome


class RecordedAttempt:
    """One attempt as the retry loop reported it. ``failed``/``nbytes`` stay None until it ended; ``ended``
    counts ``end`` calls (exactly 1 for every attempt of a finished call)."""

    def __init__(self, chunk: int, attempt: int, keys: int, backoff_s: float, forward: AttemptScope) -> None:
        self.chunk = chunk
        self.attempt = attempt
        self.keys = keys
        self.backoff_s = backoff_s
        self.failed: Counter[ErrorCode] | None = None
        self.nbytes: int | None = None
        self.routing: Any = None  # the attempt's ``RoutingReport``, when routing did something
        self.ended = 0
        self._forward = forward

    def end(self, failed: Counter[ErrorCode], nbytes: int, routing: Any = None) -> None:
        self.failed = Counter(failed)
        self.nbytes = nbytes
        self.routing = routing
        self.ended += 1
        if routing is None:
            self._forward.end(failed, nbytes)
        else:
            self._forward.end(failed, nbytes, routing)


class RecordedOperation:
    """One client call: its attempts (from any thread) and the summaries it ended with (one per call)."""

    def __init__(
        self, recorder: RecordingObserver, operation: Operation, batch_size: int, forward: OperationScope
    ) -> None:
        self.operation = operation
        self.batch_size = batch_size
        self.attempts: list[RecordedAttempt] = []
        self.summaries: list[OperationSummary] = []
        self._recorder = recorder
        self._forward = forward
        self._lock = threading.Lock()

    @property
    def summary(self) -> OperationSummary | None:
        """The summary the call ended with (None while it runs)."""
        return self.summaries[-1] if self.summaries else None

    def attempt(self, chunk: int, attempt: int, keys: int, backoff_s: float) -> RecordedAttempt:
        recorded = RecordedAttempt(
            chunk, attempt, keys, backoff_s, self._forward.attempt(chunk, attempt, keys, backoff_s)
        )
        with self._lock:
            self.attempts.append(recorded)
        self._recorder._attempted(attempt)
        return recorded

    def end(self, summary: OperationSummary) -> None:
        with self._lock:
            self.summaries.append(summary)
        self._recorder._ended(summary)
        self._forward.end(summary)


class RecordingObserver:
    """Records every call and keeps running totals; thread-safe.

    Args:
        forward: also receives every call (e.g. an ``OTelObserver``); may be reassigned between calls.
        keep: keep each ``RecordedOperation`` in ``operations``; False keeps only the totals (long runs).
    """

    def __init__(self, forward: Observer = NOOP_OBSERVER, keep: bool = True) -> None:
        self.forward = forward
        self.keep = keep
        self.operations: list[RecordedOperation] = []
        self.outcomes: Counter[Outcome] = Counter()  # calls by outcome
        self.attempts = 0  # store calls
        self.retries = 0  # store calls after the first of their chunk
        self.keys_retried_ok = 0  # keys that made it only after a retry
        self.ejected: list[str] = []  # storage endpoints the client ejected, in order
        self._lock = threading.Lock()

    def operation(self, operation: Operation, batch_size: int) -> RecordedOperation:
        recorded = RecordedOperation(self, operation, batch_size, self.forward.operation(operation, batch_size))
        if self.keep:
            with self._lock:
                self.operations.append(recorded)
        return recorded

    def node_ejected(self, endpoint: str) -> None:
        with self._lock:
            self.ejected.append(endpoint)
        forward = getattr(self.forward, "node_ejected", None)
        if forward is not None:
            forward(endpoint)

    def _attempted(self, attempt: int) -> None:
        with self._lock:
            self.attempts += 1
            self.retries += attempt > 1

    def _ended(self, summary: OperationSummary) -> None:
        with self._lock:
            self.outcomes[summary.outcome] += 1
            self.keys_retried_ok += summary.keys_retried_ok

    def totals(self) -> dict[str, int]:
        """Calls, attempts, retries, and calls by outcome (keyed by the outcome's telemetry name)."""
        with self._lock:
            return {
                "operations": sum(self.outcomes.values()),
                "attempts": self.attempts,
                "retries": self.retries,
                **{o.value: self.outcomes[o] for o in Outcome},
            }

    def clear(self) -> None:
        """Forget everything recorded so far."""
        with self._lock:
            self.operations.clear()
            self.outcomes.clear()
            self.attempts = self.retries = self.keys_retried_ok = 0
            self.ejected.clear()
