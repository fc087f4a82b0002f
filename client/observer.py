"""The hooks through which the retry loop reports what it does.

``attempts.run_chunk`` reports every attempt to an ``AttemptScope`` and the client reports every call to
an ``OperationScope``; ``Observer.operation`` opens the latter. The telemetry package implements them
with OpenTelemetry; ``NOOP_OBSERVER`` does nothing. Scopes receive counts and bounded code sets only,
never keys or values.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from .errors import ErrorCode, Operation, Outcome


class AttemptScope(Protocol):
    """One store call on the pending keys of one chunk."""

    def end(self, failed: Counter[ErrorCode], nbytes: int) -> None:
        """The attempt returned; ``failed`` counts the keys that failed, by code."""


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


class OperationSummary:
    """What one call did, for the operation span and metrics."""

    __slots__ = ("outcome", "attempts", "keys_ok", "keys_retried_ok", "keys_failed", "retry_delay_s", "nbytes")

    def __init__(
        self,
        outcome: Outcome,
        attempts: int,
        keys_ok: int,
        keys_retried_ok: int,
        keys_failed: int,
        retry_delay_s: float,
        nbytes: int,
    ) -> None:
        self.outcome = outcome
        self.attempts = attempts  # store calls made, over all chunks
        self.keys_ok = keys_ok  # succeeded on their first attempt
        self.keys_retried_ok = keys_retried_ok  # succeeded after at least one failed attempt
        self.keys_failed = keys_failed
        self.retry_delay_s = retry_delay_s  # backoff slept, summed over chunks
        self.nbytes = nbytes


class _NoopAttempt:
    def end(self, failed: Counter[ErrorCode], nbytes: int) -> None:
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


NOOP_OBSERVER: Observer = NoopObserver()
