"""The exceptions the client raises on purpose.

A call that cannot complete raises one ``BatchOperationError`` subclass per cause (its ``outcome``), naming
every failed key with its last ``ErrorCode``; nothing of such a call is reported as success.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import ClassVar

from tq_mooncake.telemetry.conventions import Operation, Outcome

from .codes import ErrorCode


class MooncakeClientError(Exception):
    """Base class of every error this package raises on purpose."""


class ClientClosedError(MooncakeClientError, RuntimeError):
    """The client was closed (before or during the call)."""


class StoreSetupError(MooncakeClientError, RuntimeError):
    """Connecting to the Mooncake store failed; the message names the addresses tried."""


_SHOWN_KEYS = 10


class BatchOperationError(MooncakeClientError, RuntimeError):
    """A call could not complete: some keys failed. Nothing of it is reported as success.

    Attributes:
        operation: ``put``, ``get`` or ``clear``.
        outcome: why the call failed (an ``Outcome`` whose ``failed`` is true).
        failed: every failed key with its last code, in the caller's key order.
        succeeded: how many keys of the call succeeded (for ``put``: were written).
        attempts: the largest number of attempts made on any chunk.
    """

    outcome: ClassVar[Outcome]  # set by each subclass: one per failed outcome (ERROR_FOR_OUTCOME)
    _reason: ClassVar[str]

    def __init__(self, operation: Operation, failed: Mapping[str, ErrorCode], succeeded: int, attempts: int) -> None:
        if not hasattr(type(self), "outcome"):
            raise TypeError(f"{type(self).__name__} names no outcome: raise one of its subclasses (ERROR_FOR_OUTCOME)")
        self.operation = operation
        self.failed = dict(failed)
        self.succeeded = succeeded
        self.attempts = attempts
        super().__init__(self._message())

    def __reduce__(self) -> tuple[type[BatchOperationError], tuple[Operation, dict[str, ErrorCode], int, int]]:
        """Pickled (and copied) by its arguments: the error crosses process boundaries (Ray) intact."""
        return type(self), (self.operation, self.failed, self.succeeded, self.attempts)

    @property
    def codes(self) -> Counter[ErrorCode]:
        """How many failed keys ended with each code."""
        return Counter(self.failed.values())

    def _message(self) -> str:
        shown = ", ".join(f"{k!r}: {c.describe()}" for k, c in list(self.failed.items())[:_SHOWN_KEYS])
        more = len(self.failed) - _SHOWN_KEYS
        if more > 0:
            shown += f", ... and {more} more"
        summary = ", ".join(f"{c.name} x{n}" for c, n in self.codes.most_common())
        return (
            f"mooncake {self.operation.value} failed ({self._reason}) for {len(self.failed)} key(s) after "
            f"{self.attempts} attempt(s) [{summary}]; {self.succeeded} key(s) succeeded. Failed keys: {shown}"
        )


class RetriesExhaustedError(BatchOperationError):
    """Keys still failed with retryable codes when ``max_attempts`` was reached."""

    outcome = Outcome.EXHAUSTED
    _reason = "retries exhausted"


class NonRetryableError(BatchOperationError):
    """Keys failed with codes that retrying cannot fix (missing key, bad parameters, size/checksum mismatch)."""

    outcome = Outcome.NON_RETRYABLE
    _reason = "not retryable"


class RetryBudgetExhaustedError(BatchOperationError):
    """The client's shared retry budget was spent, so failed keys were not retried."""

    outcome = Outcome.BUDGET_DENIED
    _reason = "retry budget spent"


class DeadlineExceededError(BatchOperationError, TimeoutError):
    """The call's deadline (``retry.deadline_s``) left no time for the next retry."""

    outcome = Outcome.DEADLINE_EXCEEDED
    _reason = "deadline exceeded"


ERROR_FOR_OUTCOME: dict[Outcome, type[BatchOperationError]] = {
    cls.outcome: cls
    for cls in (RetriesExhaustedError, NonRetryableError, RetryBudgetExhaustedError, DeadlineExceededError)
}
